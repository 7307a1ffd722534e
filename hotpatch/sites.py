"""Sites: the redirection of one function entry (ftrace's ops for one address).

This is the low-level layer the livepatch model builds on.  A :class:`Site`
is a function entry together with its original bytes, the code that still
runs the old function (:attr:`Site.original`) and the form of the
redirection currently written there:

``"direct"``
    ``jmp rel32`` straight to the new code (it must lie within +-2 GiB).
``"slot"``
    ``jmp rel32`` to a near trampoline ``jmp [rip+d]`` whose 8-byte slot holds
    the target; retargeting is one atomic store, no code write.
``"call"``
    ``call rel32`` into the shared caller of the C core, which runs the site's
    observers and continues at the target (ftrace's call path; it costs a
    return-stack misprediction, so it is used only where observers are).

A direct or slot site may go through its *hot-patch point* instead
(``native/hop.c``): a ``jmp rel8`` over the entry's first instruction to a
``jmp rel32`` written in the dead padding just before the entry.  A batch
takes that way where the ``jmp rel32`` at the entry would need a stop of the
other threads and the hot-patch points make the whole batch need none.

Every operation takes a batch and is all-or-nothing: the whole batch is
analysed and prepared first (nothing written), then the entries are written
in one stop of the other threads by the C core (see
``hotpatch/native/codewrite.c``).  :func:`redirect` of a function with no
site yet is one call of the C core instead (``native/first.c``), taking the
same decisions.  Analysis of the
bytes is :mod:`hotpatch.x86_64`'s; this module decides forms and never
encodes an instruction itself.
"""
from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

from . import _procfs
from ._locks import OperationLock
from ._native import ffi, lib
from .errors import HotpatchError, TransitionError, UnsafeToPatch
from .x86_64 import encode
from .x86_64.entry import (NATIVE_PLAN, EntryPlan, analyze_entries, analyze_entry, build_original,
                           check_native_branches_into, native_plan_batch, native_plan_ranges,
                           native_result, native_results, original_stub_size_bound,
                           run_native_plans)
from .x86_64.xrefs import could_branch_into

FORMS = ("direct", "slot", "call")

#: How long a stop may wait for every other thread to be held.
STOP_TIMEOUT_MS = 2000


def _refused(what: str) -> HotpatchError:
    return HotpatchError(
        f"{what}: hotpatch is already preparing or writing sites in this thread (this was "
        f"called from a signal handler or a callback in the middle of it); it cannot wait "
        f"for that: retry after it returns")


# Not re-entrant: a second batch from a signal handler in the middle of a
# batch would plan against entries the first one is about to overwrite.
_lock = OperationLock(1, _refused)
_sites: dict[int, "Site"] = {}    # by entry; kept after restore to reuse the stub
# Pool memory of sites whose object was unloaded (see forget): reused for
# new stubs and trampolines, so that load/patch/unload cycles stay flat.
_free_code: list[tuple[int, int]] = []    # (address, size)
_free_slots: list[object] = []            # uint64_t *


@dataclass(eq=False, slots=True)
class Site:
    """A function entry that hotpatch redirects (or did, and may again)."""

    entry: int
    plan: EntryPlan
    original: int                  # address that runs the old code
    # The original stub's block, where the C core planned it (0: the plan
    # tells): freeing it must not decode the plan again (the Python decoder
    # is not for the loader's worker to import in the middle of an event).
    # Fourth: the C core's sites give it by position (a keyword costs a
    # 1,000-site batch 0.3 ms).
    _stub_size: int = field(default=0, repr=False)
    form: str | None = None        # current form, None while not installed
    target: int | None = None      # where calls go now, None while not installed
    _slot: object = field(default=None, repr=False)        # uint64_t * (slot form)
    _trampoline: int = field(default=0, repr=False)         # jmp [rip+d] (slot form)
    _call_site: object = field(default=None, repr=False)    # struct hp_call_site *
    _caller: int = field(default=0, repr=False)             # shared caller (call form)
    hopped: bool = False           # the entry goes through the hot-patch point now
    # The hot-patch point: None until looked for, 0 where there is none or
    # the entry needs none (its first instruction covers the jmp rel32:
    # _stops_plainly is False).
    _hop: int | None = field(default=None, repr=False)
    _stops_plainly: bool = field(default=True, repr=False)   # the jmp rel32 needs a stop
    _hop_to: int = field(default=0, repr=False)             # its jmp's destination, 0: padding
    _hop_padding: bytes = field(default=b"", repr=False)    # its bytes before the first jmp
    # The start of the function holding an address, else of the one before
    # it, from the symbol table (see prepare_batch), or None.
    _function_before: object = field(default=None, repr=False)

    @property
    def installed(self) -> bool:
        return self.form is not None

    @property
    def written(self) -> bytes | None:
        """The bytes hotpatch wrote at the entry (None while not installed):
        what a later write expects to find there, so that code changed since
        -- the object unloaded, another one mapped at its address -- is never
        overwritten.  They follow from the form and target alone."""
        if self.form is None:
            return None
        return _entry_bytes(self, self.form, self.target, self.hopped)

    @property
    def address(self) -> int:
        """Where the redirecting instruction is written (after any endbr64)."""
        return self.plan.address

    @property
    def kind(self) -> str:
        """``"fentry"``, ``"nops"`` or ``"generic"``: see :mod:`hotpatch.x86_64.entry`."""
        return self.plan.kind

    def __repr__(self) -> str:
        state = f"{self.form} -> {self.target:#x}" if self.installed else "restored"
        via = f" via {self._hop:#x}" if self.hopped else ""
        return f"<Site {self.entry:#x} {self.kind} {state}{via}>"


# ---------------------------------------------------------------------------
# Memory of this process


def read_memory(address: int, size: int) -> bytes:
    """Bytes of this process's memory, read without faulting (a HotpatchError
    where the range is not mapped: its object may have been unloaded)."""
    buffer = ffi.new("char[]", size)
    if lib.hp_read_memory(address, buffer, size) != size:
        raise HotpatchError(f"{address:#x}: {size} bytes there are not mapped")
    return ffi.buffer(buffer, size)[:]


def still_written(site: Site) -> bool:
    """Whether the entry still holds what hotpatch wrote there: not when its
    object was unloaded (unmapped, or another object -- or the same one
    loaded again -- is mapped there now)."""
    try:
        return site.written is None or read_memory(site.address, len(site.written)) == site.written
    except HotpatchError:
        return False


def executable_ranges() -> list[tuple[int, int]]:
    """Executable mappings of this process, from its maps."""
    ranges = []
    # Not /proc/self/maps: it reads empty once the main thread has exited.
    with open(f"{_procfs.SELF}/maps") as maps:
        for line in maps:
            span, perms = line.split(None, 2)[:2]
            if "x" in perms:
                lo, hi = span.split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


# ---------------------------------------------------------------------------
# Preparing a site: analysis and the original stub, nothing written at the entry


def _alloc_code(near: int, size: int) -> int:
    """Pool code within reach of ``near``: a freed block first, else new."""
    for i, (address, free) in enumerate(_free_code):
        if free >= size and encode.in_reach(near, address) and encode.in_reach(near, address + free):
            del _free_code[i]
            return address
    return lib.hp_alloc_code(near, size)


def _alloc_slot(near: int):
    for i, slot in enumerate(_free_slots):
        if encode.in_reach(near, int(ffi.cast("uintptr_t", slot))):
            return _free_slots.pop(i)
    return lib.hp_alloc_slot(near)


def _no_stub_memory(plan: EntryPlan) -> UnsafeToPatch:
    return UnsafeToPatch(f"{plan.entry:#x}: no free memory within +-2 GiB for the original "
                         f"stub{_procfs.exited_main_thread_note()}")


def _new_original_stub(plan: EntryPlan) -> int:
    if plan.body is not None:
        return plan.body    # the old body is intact after the patchable NOP
    size = original_stub_size_bound(plan)
    stub = _alloc_code(plan.address, size)
    if not stub:
        raise _no_stub_memory(plan)
    code = build_original(plan, stub)
    if lib.hp_write_code(stub, code, len(code)):
        raise HotpatchError(f"{plan.entry:#x}: cannot write the original stub at {stub:#x}")
    return stub


def _new_original_stubs(plans: Sequence[EntryPlan]) -> list[int | HotpatchError]:
    """:func:`_new_original_stub` of each plan of a batch, or the error.  The
    pool hands out consecutive blocks, so the stubs are written by runs of
    adjacent blocks, each padded with int3 to its block's end: one write
    for most of a batch instead of one per stub."""
    stubs: list = []
    runs: list[tuple[int, bytearray, list[int]]] = []     # (start, bytes, indexes in stubs)
    for plan in plans:
        if plan.body is not None:
            stubs.append(plan.body)    # the old body is intact after the patchable NOP
            continue
        size = original_stub_size_bound(plan)
        stub = _alloc_code(plan.address, size)
        try:
            if not stub:
                raise _no_stub_memory(plan)
            code = build_original(plan, stub)
        except HotpatchError as e:
            stubs.append(e)
            continue
        block = code + b"\xcc" * (_block_size(size) - len(code))
        if not runs or runs[-1][0] + len(runs[-1][1]) != stub:
            runs.append((stub, bytearray(), []))
        runs[-1][1].extend(block)
        runs[-1][2].append(len(stubs))
        stubs.append(stub)
    for start, code, indexes in runs:
        if lib.hp_write_code(start, bytes(code), len(code)):
            for i in indexes:
                stubs[i] = HotpatchError(f"{plans[i].entry:#x}: cannot write the original stub "
                                         f"at {stubs[i]:#x}")
    return stubs


_PLAN_OK, _PLAN_UNWRITTEN = lib.HP_PLAN_OK, lib.HP_PLAN_UNWRITTEN

#: pool.c rounds every code block up to this.
_POOL_ALIGN = 16


def _block_size(size: int) -> int:
    """The bytes pool.c gives for a request of ``size``."""
    return (size + _POOL_ALIGN - 1) & ~(_POOL_ALIGN - 1)


def prepare(entry: int, *, size: int | None = None,
            exec_ranges: Sequence[tuple[int, int]] | None = None,
            fentry_targets=(), branches_into=None) -> Site:
    """The site for the function at ``entry``, analysed and with its original
    code ready; nothing is written at the entry.  A site restored earlier is
    reused when its bytes are still the ones it saved.  ``branches_into``:
    see :func:`hotpatch.x86_64.analyze_entry`."""
    with _lock.operation(f"prepare the site at {entry:#x}"):
        return _prepare(entry, size=size, exec_ranges=exec_ranges, fentry_targets=fentry_targets,
                        branches_into=branches_into)


def _reusable(entry: int) -> Site | None:
    """The site kept for ``entry``, if its bytes are still the ones it saved."""
    site = _sites.get(entry)
    if site is not None:
        if site.installed or read_memory(site.address, site.plan.length) == site.plan.original_bytes:
            return site
    return None


def _prepare(entry: int, *, size: int | None = None,
             exec_ranges: Sequence[tuple[int, int]] | None = None,
             fentry_targets=(), branches_into=None) -> Site:
    site = _reusable(entry)
    if site is not None:
        return site
    if exec_ranges is None:
        exec_ranges = executable_ranges()
    plan = analyze_entry(read_memory, entry, size=size, exec_ranges=exec_ranges,
                         fentry_targets=fentry_targets, branches_into=branches_into)
    site = Site(entry=entry, plan=plan, original=_new_original_stub(plan))
    _sites[entry] = site
    _file(site)
    return site


def prepare_batch(functions: Sequence[tuple[int, int | None]], *,
                  exec_ranges: Sequence[tuple[int, int]] | None = None,
                  fentry_targets=(), branches_into=None,
                  branch_index=None, function_before=None) -> list[Site | HotpatchError]:
    """:func:`prepare` for each ``(entry, size)``.  The C core plans the
    common entry shapes of the whole batch and writes their original stubs
    in one call (``native/plan.c``); the other functions, and every refusal,
    are planned by :mod:`hotpatch.x86_64.entry` as :func:`prepare` does,
    their bytes read and decoded in one call too.  ``branch_index``: the
    callable returning the object's :class:`~hotpatch.x86_64.xrefs.BranchIndex`
    (called only where a plan needs it), which lets the C core answer what
    ``branches_into`` answers; a :class:`~hotpatch.symbols.BranchIndexOf`
    (the livepatch model's) also says whether a small batch should scan the
    object's code first or ask the index.  ``function_before``: the callable
    returning the start of the function symbol holding an address, else of
    the last one before it (or None): where the bytes before an entry do not
    tell whether its padding is dead, a sweep from there does (see
    :func:`hot_patch_point`); a :class:`~hotpatch.symbols.FunctionBefore`
    (the livepatch model's) is looked up by the C core, only there.  For each function, its site
    or the error refusing it: the caller decides whether one refusal fails
    the batch."""
    with _lock.operation(f"prepare a batch of {len(functions)} sites"):
        if exec_ranges is None:
            exec_ranges = executable_ranges()
        entries = [entry for entry, _ in functions]
        if len(set(entries)) == len(entries) and _sites.keys().isdisjoint(entries):
            # A first patch of distinct functions, most of a big batch: each
            # is its own result, without the bookkeeping below.
            return _prepare_all(functions, exec_ranges, fentry_targets, branches_into,
                                branch_index, function_before)
        results: list = [None] * len(functions)
        todo: dict[int, list[int]] = {}        # entry -> indexes asking for it
        for i, entry in enumerate(entries):
            results[i] = _reusable(entry)
            if results[i] is None:
                todo.setdefault(entry, []).append(i)
        made = _prepare_all([functions[indexes[0]] for indexes in todo.values()], exec_ranges,
                            fentry_targets, branches_into, branch_index, function_before)
        for site, indexes in zip(made, todo.values()):
            for i in indexes:
                results[i] = site
        return results


def _prepare_all(wanted: Sequence[tuple[int, int | None]], exec_ranges, fentry_targets,
                 branches_into, branch_index, function_before) -> list[Site | HotpatchError]:
    """The sites of ``wanted`` (distinct entries with no site kept): the C
    core's first, Python's for the rest."""
    made = _prepare_natively(wanted, exec_ranges, branches_into, branch_index)
    rest = [k for k, site in enumerate(made) if site is None]
    if rest:
        for k, site in zip(rest, _prepare_in_python([wanted[k] for k in rest], exec_ranges,
                                                    fentry_targets, branches_into)):
            made[k] = site
    if function_before is not None:
        for site in made:
            if isinstance(site, Site):
                site._function_before = function_before
    return made


def _prepare_natively(wanted: Sequence[tuple[int, int | None]], exec_ranges, branches_into,
                      branch_index) -> list[Site | HotpatchError | None]:
    """The sites of the common shapes among ``wanted``, planned and their
    stubs written by the C core; None for the functions left to Python."""
    batch = native_plan_batch(wanted)
    free = _free_blocks()
    several = run_native_plans(batch, len(wanted), exec_ranges, 1, free, len(_free_code))
    _keep_free_blocks(free)
    # Branches from elsewhere into the replaced bytes: the index in C, else
    # the Python question per plan.  A small batch asks the object's raw
    # bytes first: none that could encode such a branch, no index to build.
    ask = several and branches_into is not None and branch_index is None
    try:
        if several and branch_index is not None and _may_be_branched_into(
                batch, len(wanted), exec_ranges, branch_index):
            check_native_branches_into(batch, len(wanted), branch_index())
        # Every site about to be made filed at once, by the C core from the
        # plans (one Python refuses below is taken out again).
        if lib.hp_near_file_plans(batch, len(wanted)):
            raise MemoryError("no memory to file the batch's sites")
    except BaseException:
        # No site was made: the stubs written are free again, none filed.
        for b in batch[0:len(wanted)]:
            lib.hp_near_unfile(b.entry)
        _free_code.extend((b.stub, b.stub_size) for b in batch[0:len(wanted)]
                          if b.stub and b.status != _PLAN_UNWRITTEN)
        raise
    made: list = []
    for status, plan, stub, stub_size in native_results(batch, len(wanted)):
        if status == _PLAN_OK:
            if ask and not plan.single_instruction and _foreign_branch_into(branches_into, plan):
                _free_code.append((stub, stub_size))    # Python refuses it, in its words
                lib.hp_near_unfile(plan.entry)
                made.append(None)
                continue
            site = _sites[plan.entry] = Site(plan.entry, plan, stub, stub_size)
            made.append(site)
        elif status == _PLAN_UNWRITTEN:
            made.append(HotpatchError(f"{plan.entry:#x}: cannot write the original stub at "
                                      f"{stub:#x}"))
        else:
            if stub:
                _free_code.append((stub, stub_size))    # taken, then left to Python
            made.append(None)
    return made


def _free_blocks():
    """``_free_code`` as the C core's ``struct hp_code_block[]``, for it to
    take stubs from (a block taken gets size 0: see :func:`_keep_free_blocks`)."""
    return ffi.new("struct hp_code_block[]", _free_code or 1)


def _keep_free_blocks(free) -> None:
    """``_free_code`` without the blocks the C core took from ``free``."""
    if _free_code:
        _free_code[:] = [(block.address, block.size) for block in free[0:len(_free_code)]
                         if block.size]


#: Batches up to this size ask the raw bytes before the branch index: one
#: pass over the object's code for all of them (a third of the index's
#: build); a bigger batch pays for the index anyway.
_FEW_FOR_RAW_BYTES = 16


def _may_be_branched_into(batch, n: int, exec_ranges, branch_index) -> bool:
    """Whether a branch could land inside the bytes a plan of ``batch``
    replaces (several instructions: no branch lands inside one), as far as
    the object's raw bytes tell (see :func:`could_branch_into`); True, for
    the index to tell, where a scan is not worth it: a big batch, or the
    model's :class:`~hotpatch.symbols.BranchIndexOf` says so (its index is
    built, or small batches scanned the object often enough)."""
    if n > _FEW_FOR_RAW_BYTES:
        return True
    into = [(plan.address + 1, plan.address + plan.length)
            for status, plan, _, _ in native_results(batch, n)
            if status == _PLAN_OK and not plan.single_instruction]
    if not into:
        return False
    worth_a_scan = getattr(branch_index, "worth_a_scan", None)
    return (worth_a_scan is not None and not worth_a_scan()) or \
        could_branch_into(exec_ranges, into)


def _foreign_branch_into(branches_into, plan: EntryPlan) -> bool:
    lo, hi = plan.address, plan.address + plan.length
    return any(not lo <= source < hi for source, _, _ in branches_into(lo + 1, hi))


def _prepare_in_python(wanted: Sequence[tuple[int, int | None]], exec_ranges, fentry_targets,
                       branches_into) -> list[Site | HotpatchError]:
    """The sites of ``wanted`` planned by :mod:`hotpatch.x86_64.entry`, the
    bytes of all of them read and decoded in one call of the C core."""
    plans = analyze_entries(wanted, exec_ranges=exec_ranges, fentry_targets=fentry_targets,
                            branches_into=branches_into)
    good = [p for p in plans if not isinstance(p, HotpatchError)]
    stubs = dict(zip(map(id, good), _new_original_stubs(good)))
    made = []
    for (entry, _), plan in zip(wanted, plans):
        result = plan
        if not isinstance(plan, HotpatchError):
            result = stubs[id(plan)]
            if not isinstance(result, HotpatchError):
                result = _sites[entry] = Site(entry=entry, plan=plan, original=result)
                _file(result)
        made.append(result)
    return made


# ---------------------------------------------------------------------------
# Entry bytes for each form


def _choose_form(site: Site, target: int, form: str | None) -> str:
    if form is None or form == "auto":
        if site.form in ("slot", "call") and form is None:
            return site.form      # a pinned form stays until asked otherwise
        return "direct" if encode.in_reach(site.address, target) else "slot"
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS} or 'auto', not {form!r}")
    if form == "direct" and not encode.in_reach(site.address, target):
        raise UnsafeToPatch(f"{site.entry:#x}: target {target:#x} is beyond +-2 GiB; "
                            "use the slot form")
    return form


def _ensure_slot(site: Site) -> None:
    if site._slot is None:
        slot = _alloc_slot(site.address)
        trampoline = _alloc_code(site.address, encode.JMP_RIP_INDIRECT_SIZE)
        if slot == ffi.NULL or not trampoline:
            raise UnsafeToPatch(f"{site.entry:#x}: no free memory within +-2 GiB for a "
                                f"trampoline{_procfs.exited_main_thread_note()}")
        code = encode.jmp_rip_indirect(trampoline, int(ffi.cast("uintptr_t", slot)))
        if lib.hp_write_code(trampoline, code, len(code)):
            raise HotpatchError(f"{site.entry:#x}: cannot write the trampoline at {trampoline:#x}")
        site._slot, site._trampoline = slot, trampoline


def _ensure_call(site: Site) -> None:
    if site._call_site is None:
        caller = lib.hp_caller_near(site.address)
        call_site = lib.hp_call_site(site.address)
        if not caller or call_site == ffi.NULL:
            raise UnsafeToPatch(f"{site.entry:#x}: no free memory within +-2 GiB for the "
                                f"caller{_procfs.exited_main_thread_note()}")
        site._call_site, site._caller = call_site, caller


# The instruction a form puts at the entry: (opcode, destination) of a rel32
# jmp or call; (0, 0) stands for the site's original bytes.
_JMP_REL32, _CALL_REL32 = 0xE9, 0xE8


def _entry_instruction(site: Site, form: str | None, target: int | None) -> tuple[int, int]:
    """``(opcode, destination)`` of the instruction ``form`` writes at the entry."""
    if form is None:
        return 0, 0
    if form == "direct":
        return _JMP_REL32, target
    if form == "slot":
        return _JMP_REL32, site._trampoline
    return _CALL_REL32, site._caller


def _entry_bytes(site: Site, form: str | None, target: int | None, via_hop: bool) -> bytes:
    """The bytes ``form`` puts at the entry: the redirecting instruction
    followed by int3s up to the replaced length (no thread ever runs those
    bytes, and one that jumped there would stop loudly); ``via_hop``, the
    short jmp to the hot-patch point over the first instruction, the rest
    as it was; or the original bytes."""
    op, to = _entry_instruction(site, form, target)
    if not op:
        return site.plan.original_bytes
    at = site.address
    if via_hop:
        return encode.jmp_rel8(at, site._hop) + site.plan.original_bytes[2:]
    instruction = (encode.jmp_rel32(at, to) if op == _JMP_REL32 else encode.call_rel32(at, to))
    return instruction + b"\xcc" * (site.plan.length - len(instruction))


# ---------------------------------------------------------------------------
# Writing batches


class _Changes:
    """A batch: what each site becomes (its form and target; None for a
    restore), and the entry writes that make it, built by the C core in one
    call (``hp_entry_writes``: most sites of a batch only need a ``jmp``
    encoded)."""

    __slots__ = ("sites", "forms", "targets", "hops", "writes", "count", "rewritten", "retargets")

    def __init__(self, sites: list[Site], forms: list, targets: list, hops: list,
                 rows: list[tuple]) -> None:
        self.sites, self.forms, self.targets = sites, forms, targets
        #: whether each site goes through its hot-patch point after the batch
        self.hops = hops
        n = len(rows)
        # Packed by struct, not converted by cffi field by field (a third of
        # a 1,000-site batch's Python); by starmap, with no Python loop.
        packed = b"".join(itertools.starmap(_CHANGE.pack, rows)) or bytes(_CHANGE.size)
        changes = ffi.from_buffer("struct hp_entry_change[]", packed)
        self.writes = ffi.new("struct hp_write[]", 2 * n or 1)   # an entry and its hop
        rewritten = ffi.new("uint8_t[]", n or 1)
        self.count = lib.hp_entry_writes(changes, n, self.writes, rewritten)
        if self.count < 0:
            raise HotpatchError("an entry write of this batch does not fit hotpatch's writes "
                                "(a site replacing more than 16 bytes, or a target out of reach)")
        #: whether each change writes its entry (bytes, one per change)
        self.rewritten = ffi.buffer(rewritten, n)[:]
        #: indexes of the changes that end in the slot or call form
        self.retargets = [i for i, f in enumerate(forms) if f == "slot" or f == "call"] \
            if _forms_with_targets.intersection(forms) else []


_forms_with_targets = frozenset(("slot", "call"))
#: What ``target - address`` may be for a jmp rel32 at ``address`` to reach
#: ``target`` (encode.in_reach).
_REACH_LOW = encode.JMP_REL32_SIZE - (1 << 31)
_REACH_HIGH = encode.JMP_REL32_SIZE + (1 << 31) - 1

#: struct hp_entry_change, as _Changes packs it (checked against cffi's layout).
_CHANGE = struct.Struct("<QB7xQB7xQI24s4xQQ??6x")
if (_CHANGE.size, ffi.offsetof("struct hp_entry_change", "hop"),
        ffi.offsetof("struct hp_entry_change", "new_hop")) != (
        ffi.sizeof("struct hp_entry_change"), 72, 89):
    raise ImportError("struct hp_entry_change's layout is not the one sites.py packs")


def _plan_changes(redirects: Sequence[tuple[Site, int]], restores: Sequence[Site],
                  form: str | None, hops: bool = False) -> _Changes:
    """The batch that sends each ``(site, target)`` of ``redirects`` to its
    target and restores each site of ``restores``.  ``hops``: first installs
    go through their hot-patch points (see :func:`_hops_spare_a_stop`)."""
    sites, forms, targets, via, rows = [], [], [], [], []
    checked = lib.hp_near_points() > 0
    for site, target in redirects:
        target = int(target)
        plan = site.plan
        # encode.in_reach of a jmp rel32, inline: most of a batch asks it.
        if site.form is None and form is None and \
                _REACH_LOW <= target - plan.address <= _REACH_HIGH:
            # A first direct install, most of a batch: its instruction and
            # its hop's jmp follow from the target alone.
            hop = hops and bool(site._hop)
            new_form = "direct"
            row = (plan.address, 0, 0, _JMP_REL32, target, plan.length, plan.original_bytes,
                   site._hop or 0, target if hop else site._hop_to, False, hop)
        else:
            if site.form is None and form is None:
                new_form, now = "slot", (0, 0)
                hop = hops and bool(site._hop)
            else:
                new_form = _choose_form(site, target, form)
                now = _entry_instruction(site, site.form, site.target)
                hop = (site.hopped or (hops and site.form is None and bool(site._hop))) \
                    and new_form != "call"
            if new_form == "slot":
                _ensure_slot(site)
            elif new_form == "call":
                _ensure_call(site)
            # The hop's jmp as _point_hops leaves it, before the entry leads there.
            hop_to = _destination(site, new_form, target) if hop and not site.hopped \
                else site._hop_to
            row = (plan.address, *now, *_entry_instruction(site, new_form, target), plan.length,
                   plan.original_bytes, site._hop or 0, hop_to, site.hopped, hop)
        if checked and not hop and not site.hopped and _overlaps_a_hop(plan):
            raise UnsafeToPatch(f"{site.entry:#x}: the jmp at the entry would cover the "
                                f"hot-patch point of the function after it")
        rows.append(row)
        sites.append(site)
        forms.append(new_form)
        targets.append(target)
        via.append(hop)
    for site in restores:
        if not site.installed:
            raise HotpatchError(f"{site.entry:#x}: site is not installed")
        plan = site.plan
        rows.append((plan.address, *_entry_instruction(site, site.form, site.target), 0, 0,
                     plan.length, plan.original_bytes, site._hop or 0, site._hop_to, site.hopped,
                     False))
        sites.append(site)
        forms.append(None)
        targets.append(None)
        via.append(False)
    return _Changes(sites, forms, targets, via, rows)


# ---------------------------------------------------------------------------
# Hot-patch points (native/hop.c)

#: A hot-patch point's jmp rel32.
_HOP_SIZE = encode.JMP_REL32_SIZE


def hot_patch_point(site: Site) -> int:
    """The site's hot-patch point (native/hop.c), looked for once: 0 where
    its entry needs none (the first instruction covers the jmp rel32: one
    atomic store) or has none."""
    if site._hop is None:
        # Under the lock: the sites near (native/nearby.c) are read in C,
        # where another thread's batch may be filing into them.
        with _lock.query():
            _find_hops([site])
    return site._hop


def _with_hops(sites: Iterable[Site]) -> Iterator[Site]:
    """``sites``, each with its hot-patch point looked for (see
    :func:`_find_hops`) by the time it comes: a batch's in chunks, doubling
    from 8, so that a caller who stops at the first site without a point
    has not had a thousand looked for."""
    chunk_size, chunk = 8, []
    for site in sites:
        chunk.append(site)
        if len(chunk) == chunk_size:
            _find_hops([s for s in chunk if s._hop is None])
            yield from chunk
            chunk_size, chunk = min(2 * chunk_size, 512), []
    _find_hops([s for s in chunk if s._hop is None])
    yield from chunk


def _find_hops(sites: Sequence[Site]) -> None:
    """The hot-patch points of ``sites`` (native/hop.c: from one read of each
    entry's bytes, one call for all), and whether each one's jmp rel32
    needs a stop.  Where only a sweep from the function before can tell
    whether the padding is dead, the C core looks that function up in the
    index of a :class:`~hotpatch.symbols.FunctionBefore`; another
    ``function_before`` is asked for every site first.  Without one, no
    point where that sweep is needed."""
    for site, (hop, stops_plainly, padding) in zip(sites, _query_hops(sites)):
        # Not where another site's entry write reaches: a function shorter
        # than the jump, with padding after it, is planned with that
        # padding in its replaced bytes.
        if hop == lib.HP_HOP_ASK_BEFORE or (
                hop and any(other is not site for other in _sites_reaching(hop, hop + _HOP_SIZE))):
            hop = 0
        site._hop, site._stops_plainly = hop, bool(stops_plainly)
        if hop:
            site._hop_padding = padding


def _before(function_before, entry: int):
    """``(before, starts)`` of the entry at ``entry`` for the C core's point
    search (as hp_hop_in takes them, ``starts`` a ``struct
    hp_function_starts *``): the C index of a
    :class:`~hotpatch.symbols.FunctionBefore`, looked up there only where
    needed; else the function before, asked now; else nothing."""
    native = getattr(function_before, "native", None)
    if native is not None:
        return 0, native
    return (function_before(entry - 1) or 0) if function_before is not None else 0, ffi.NULL


def _query_row(site: Site) -> bytes:
    before, starts = _before(site._function_before, site.entry)
    return _QUERY_IN.pack(site.entry, site.plan.address, site.plan.length, before,
                          int(ffi.cast("uintptr_t", starts)))


# struct hp_hop_query: what is asked (entry, address, length, before,
# starts) and what follows.
_QUERY_IN = struct.Struct(f"<5Q{ffi.offsetof('struct hp_hop_query', 'hop') - 40}x"
                          f"{ffi.sizeof('struct hp_hop_query') - ffi.offsetof('struct hp_hop_query', 'hop')}x")
_QUERY_OUT = struct.Struct(f"<{ffi.offsetof('struct hp_hop_query', 'hop')}xQB5s2x")
if _QUERY_OUT.size != ffi.sizeof("struct hp_hop_query") or _QUERY_IN.size != _QUERY_OUT.size:
    raise ImportError("struct hp_hop_query's layout is not the one sites.py reads")


def _query_hops(sites: Sequence[Site]) -> list[tuple[int, int, bytes]]:
    """``hp_hops_find`` of ``sites``: ``(hop, stops_plainly, padding)`` each."""
    if not sites:
        return []
    # Packed by struct into a buffer the C core fills in: for one query a
    # third of cffi's struct array and strided columns, the same for 1,000.
    packed = bytearray(b"".join(map(_query_row, sites)))
    lib.hp_hops_find(ffi.from_buffer("struct hp_hop_query[]", packed), len(sites))
    return list(_QUERY_OUT.iter_unpack(packed))


def _hops_spare_a_stop(redirects: Sequence[tuple[Site, int]], form: str | None) -> bool:
    """Whether the first installs of a batch should go through their
    hot-patch points: where one of their entry writes needs a stop and every
    one that does has a point, so that the batch needs none.  Elsewhere the
    jmp rel32 at the entry is the better write: one jump per call, not two.
    A form named by the caller is written as named: no point.  Nor in a
    process of one thread: nothing to stop there."""
    if not redirects or form not in (None, "auto") or lib.hp_stop_forced():
        return False        # HOTPATCH_STOP=always: every batch takes the stop
    # Alone first: one fstat, where looking for a point reads and decodes
    # each entry's neighbourhood.
    if lib.hp_alone():
        return False
    wanted = False
    for site in _with_hops(site for site, _ in redirects if site.form is None):
        if site._hop:
            wanted = True
        elif site._stops_plainly:
            return False
    return wanted


def first_installs_stop(sites: Iterable[Site]) -> bool:
    """Whether a batch installing ``sites`` for the first time is likely to
    take a stop: one's jmp rel32 needs one and it has no hot-patch point
    (see :func:`_hops_spare_a_stop`), or every batch takes one
    (``HOTPATCH_STOP=always``); never in a process of one thread.  A guess
    for starting the stopper ahead: the C core decides at the write."""
    if lib.hp_stop_forced():
        return True
    if lib.hp_alone():
        return False
    with _lock.operation("look for hot-patch points"):
        return any(not site._hop and site._stops_plainly
                   for site in _with_hops(site for site in sites if site.form is None))


def _overlaps_a_hop(plan: EntryPlan) -> bool:
    """Would the jmp at this plan's entry cover a written hot-patch point?"""
    return bool(lib.hp_near_point_over(plan.address, plan.address + plan.length))


def _destination(site: Site, form: str, target: int) -> int:
    return site._trampoline if form == "slot" else target


def _point_hops(changes: _Changes) -> list[tuple[Site, int, bytes]]:
    """Make the hot-patch point of every site that starts to go through it
    jump to its destination, before its entry leads there.  A point used
    before (a straggler of an earlier install may still run it) is
    retargeted here, by one batch of atomic stores.  A point used for the
    first time is dead padding: its ``(site, destination, jmp)`` is
    returned, for :func:`_write` to put in the same hold of the core's lock
    as the entries (``hp_write_dead_then_batch``: the padding back there if
    the entries cannot be written)."""
    fresh, retargets = [], []
    for site, form, target, hop in zip(changes.sites, changes.forms, changes.targets, changes.hops):
        if not hop or site.hopped:
            continue
        to = _destination(site, form, target)
        if site._hop_to == to:
            continue
        jump = encode.jmp_rel32(site._hop, to)
        if not site._hop_to:
            fresh.append((site, to, jump))
        else:
            retargets.append((site, site._hop_to, jump, to))
    if retargets:
        writes = ffi.new("struct hp_write[]", [
            (site._hop, encode.jmp_rel32(site._hop, was), jump, _HOP_SIZE)
            for site, was, jump, _ in retargets])
        err = ffi.new("char[256]")
        if lib.hp_write_batch(writes, len(retargets), STOP_TIMEOUT_MS, err):
            raise TransitionError(ffi.string(err).decode() + _procfs.exited_main_thread_note())
        for site, _, _, to in retargets:
            site._hop_to = to
    return fresh


def _padding_changed(sites: Iterable[Site]) -> None:
    """Raise, in the words of the site, if the padding of one of ``sites``'
    hot-patch points is no longer what its search found (a write through
    them was refused)."""
    for site in sites:
        try:
            same = read_memory(site._hop, _HOP_SIZE) == site._hop_padding
        except HotpatchError:
            same = False
        if not same:
            raise TransitionError(f"{site.entry:#x}: the padding at {site._hop:#x} before "
                                  f"the entry changed: its hot-patch point cannot be used")


def _batch(changes: _Changes):
    """The ``struct hp_write[]`` of the changes that write code, and its length."""
    return changes.writes, changes.count


def _write(changes: _Changes, unreachable=None,
           fresh: Sequence[tuple[Site, int, bytes]] = ()) -> None:
    """The batch's writes, after the jmps of ``fresh``'s hot-patch points
    (see :func:`_point_hops`) in the same hold of the core's lock.  All or
    nothing."""
    batch, count = _batch(changes)
    if not count:
        return
    err = ffi.new("char[256]")
    # unreachable(batch, n, err): writes without a stop where no thread can
    # run the code yet (an object being loaded; no hot-patch point is taken
    # then); 1 = it can run now after all.
    rc = unreachable(batch, count, err) if unreachable is not None else 1
    if rc < 0:
        raise TransitionError(ffi.string(err).decode())
    if not rc:
        return
    dead = ffi.new("struct hp_write[]", [(site._hop, site._hop_padding, jump, _HOP_SIZE)
                                         for site, _, jump in fresh]) if fresh else ffi.NULL
    if lib.hp_write_dead_then_batch(dead, len(fresh), batch, count, 0, STOP_TIMEOUT_MS, err):
        _padding_changed(site for site, _, _ in fresh)
        raise TransitionError(ffi.string(err).decode() + _procfs.exited_main_thread_note())
    for site, to, _ in fresh:
        lib.hp_near_point(site.entry, site._hop)
        site._hop_to = to


def _store_targets(changes: _Changes, rewritten: bool) -> None:
    """The slot and call targets of the changes that write their entry
    (``rewritten``) or of those that do not."""
    for i in changes.retargets:
        if (changes.rewritten[i] != 0) == rewritten:
            site, target = changes.sites[i], changes.targets[i]
            if changes.forms[i] == "slot":
                lib.hp_store_slot(site._slot, target)
            else:
                lib.hp_call_site_set_target(site._call_site, target)


# The writer of the batch in progress for an object still being loaded (see
# update_batch); set only while the sites lock is held.
_unreachable = None


def _target_stores(changes: _Changes) -> list[tuple[object, int]]:
    """``(uint64_t *, value)`` of the retargets that write no code, for a
    stop to make."""
    stores = []
    for i in changes.retargets:
        if not changes.rewritten[i]:
            site, target = changes.sites[i], changes.targets[i]
            if changes.forms[i] == "slot":
                stores.append((site._slot, target))
            else:
                stores.append((lib.hp_call_site_target_slot(site._call_site), target))
    return stores


def _record(changes: _Changes) -> None:
    """The sites as the batch left them."""
    for site, form, target, hop in zip(changes.sites, changes.forms, changes.targets,
                                       changes.hops):
        site.form, site.target, site.hopped = form, target, hop
        if hop:
            site._hop_to = _destination(site, form, target)


def _commit(changes: _Changes) -> None:
    # A slot or call target is set before an entry starts to point at it;
    # where the entry already does, the store is the whole retarget, and it
    # waits until every write of the batch has succeeded.  So is a hot-patch
    # point's jmp.
    _store_targets(changes, rewritten=True)
    _write(changes, _unreachable, _point_hops(changes))
    _store_targets(changes, rewritten=False)
    _record(changes)


def _commit_in_transition(changes: _Changes, transition) -> None:
    # As _commit, but the retargets that need no code write are made in the
    # transition's stop itself: they take code away from running threads as
    # a write does.
    _store_targets(changes, rewritten=True)
    transition.write(*_batch(changes), _target_stores(changes))
    _record(changes)


def _unique(sites: Sequence[Site]) -> None:
    entries = [site.entry for site in sites]
    if len(set(entries)) == len(entries):
        return
    seen = set()
    for entry in entries:
        if entry in seen:
            raise HotpatchError(f"{entry:#x} appears twice in one batch")
        seen.add(entry)


def update_batch(redirects: Sequence[tuple[Site, int]] = (), restores: Sequence[Site] = (),
                 form: str | None = None, *, unreachable=None, transition=None) -> None:
    """One batch of code writes: send every ``(site, target)`` of
    ``redirects`` to its target (installing or retargeting) and put the
    original bytes back at every site of ``restores``.  All or nothing.

    ``form``: ``None`` keeps a site's slot or call form and otherwise picks
    ``"direct"`` where the target is in reach, else ``"slot"``; ``"auto"``
    always picks that way; a form name forces it.  Without a form name, a
    first install goes through the site's hot-patch point where that spares
    the batch a stop (see :func:`_hops_spare_a_stop`).  ``unreachable``: see
    :mod:`hotpatch.loader` (writes into an object still being loaded, which
    no thread can be running: no transition needed).  ``transition``: a
    :class:`hotpatch.transition.StackTransition` that makes the writes and
    retargets when no thread's stack holds its code (None: at once)."""
    with _lock.operation("update a batch of sites"):
        _update_batch(redirects, restores, form, unreachable, transition)


def _update_batch(redirects: Sequence[tuple[Site, int]], restores: Sequence[Site],
                  form: str | None, unreachable=None, transition=None) -> None:
    _unique([site for site, _ in redirects] + list(restores))
    # Under the stack model, and into an object being loaded, the batch is
    # written in a stop or needs none: no hot-patch point would spare one.
    hops = transition is None and unreachable is None and _hops_spare_a_stop(redirects, form)
    changes = _plan_changes(redirects, restores, form, hops)
    # Late arrivals in a restored call path must reach the old code too.
    for site in restores:
        if site.form == "call":
            lib.hp_call_site_set_target(site._call_site, site.original)
    global _unreachable
    _unreachable = unreachable
    try:
        if transition is None or unreachable is not None:
            _commit(changes)
        else:
            _commit_in_transition(changes, transition)
    except BaseException:
        for site in restores:
            if site.form == "call":
                lib.hp_call_site_set_target(site._call_site, site.target)
        raise
    finally:
        _unreachable = None


def redirect_batch(requests: Sequence[tuple[Site, int]], form: str | None = None) -> None:
    """Send every ``(site, target)`` to its target (see :func:`update_batch`)."""
    update_batch(redirects=requests, form=form)


def redirect(entry: int, target: int, *, form: str | None = None, size: int | None = None,
             exec_ranges: Sequence[tuple[int, int]] | None = None, fentry_targets=(),
             branches_into=None, function_before=None) -> Site:
    """Prepare the site at ``entry`` (the analysis as :func:`prepare`'s;
    ``function_before`` as :func:`prepare_batch`'s) and send its calls to
    ``target``.  A function with no site yet, with nothing asked of the
    analysis but its size and segments, goes the one-call way of the C core
    (``native/first.c``: the decisions of :func:`prepare_batch` and
    :func:`update_batch`, for a fraction of their cost) as far as it can."""
    target = int(target)
    with _lock.operation("redirect the function at %#x", entry):
        site = None
        if entry not in _sites and form in (None, "auto") and not fentry_targets \
                and branches_into is None:
            site = _redirect_first(entry, target, size, exec_ranges, function_before)
        if site is None:
            site = _prepare(entry, size=size, exec_ranges=exec_ranges,
                            fentry_targets=fentry_targets, branches_into=branches_into)
            if function_before is not None:
                site._function_before = function_before
        if site.form is None:           # not installed (the property is a call more)
            _update_batch([(site, target)], (), form)
        return site


# The request of the first redirect in progress (one at a time: the sites
# lock), made once: its plan as the C core's plans are read
# (native_result), its words for the entry, size and target, and what
# follows the target.
_first = ffi.new("struct hp_first *")
_first_plan = ffi.buffer(_first, ffi.sizeof("struct hp_plan"))
_first_words = memoryview(ffi.buffer(_first)).cast("Q")
_FIRST_TARGET = ffi.offsetof("struct hp_first", "target") // 8
_FIRST_BEFORE = ffi.offsetof("struct hp_first", "before") // 8
_FIRST_OUT = struct.Struct(f"<{ffi.offsetof('struct hp_first', 'hop')}xQ5sBBb")
if ffi.offsetof("struct hp_first", "written") != _FIRST_OUT.size - 1:
    raise ImportError("struct hp_first's layout is not the one sites.py reads")
_first_out = ffi.buffer(_first)
_first_err = ffi.new("char[256]")
# The last segments asked for, and their uint64_t[]: a patch's functions
# are in one object.
_last_ranges: list = [None, None]
# The FunctionBefore whose C index _first.starts points at (its "before"
# word 0), kept alive here; None where the last one asked had no index (a
# callable asked per entry, or an unreadable table: asked again each time).
_first_index_of: list = [None]


def _native_ranges(exec_ranges):
    """``exec_ranges`` as the C core's ``uint64_t[]``."""
    if _last_ranges[0] is not exec_ranges and _last_ranges[0] != tuple(exec_ranges):
        _last_ranges[:] = [tuple(exec_ranges), native_plan_ranges(exec_ranges)]
    return _last_ranges[1]


def _redirect_first(entry: int, target: int, size: int | None, exec_ranges,
                    function_before) -> Site | None:
    """The first redirect of ``entry`` by ``hp_redirect_first``: the site,
    installed unless the C core left the write to the batch path; None where
    the entry's shape is left to Python's analysis."""
    if exec_ranges is None:
        exec_ranges = executable_ranges()
    words = _first_words
    words[0], words[1], words[_FIRST_TARGET] = entry, size or 0, target
    # The function before, for a hot-patch point only a sweep from it shows:
    # the index of the same FunctionBefore as the last redirect's is in
    # _first already (a patch's functions are in one object).
    if function_before is not _first_index_of[0]:
        words[_FIRST_BEFORE], _first.starts = _before(function_before, entry)
        _first_index_of[0] = function_before if _first.starts != ffi.NULL else None
    free = _free_blocks() if _free_code else ffi.NULL
    rc = lib.hp_redirect_first(_first, _native_ranges(exec_ranges), len(exec_ranges),
                               free, len(_free_code), STOP_TIMEOUT_MS, _first_err)
    if _free_code:
        _keep_free_blocks(free)
    status, plan, stub, stub_size = native_result(*NATIVE_PLAN.unpack_from(_first_plan))
    if rc < 0:
        if status == _PLAN_OK:
            _free_code.append((stub, stub_size))    # planned, then not filed: no site
        raise UnsafeToPatch("capstone's C library cannot be used, or memory is short")
    if status == _PLAN_UNWRITTEN:
        raise HotpatchError(f"{entry:#x}: cannot write the original stub at {stub:#x}")
    if status != _PLAN_OK:
        if stub:
            _free_code.append((stub, stub_size))    # taken, then left to Python
        return None
    # Filed among the sites near by the C core already.  Its fields by
    # position: a keyword costs the call 0.1 µs warm.
    site = _sites[entry] = Site(entry, plan, stub, stub_size)
    site._function_before = function_before
    hop, padding, stops_plainly, hop_known, written = _FIRST_OUT.unpack_from(_first_out)
    if hop_known:
        site._hop, site._stops_plainly = hop, bool(stops_plainly)
        if hop:
            site._hop_padding = padding
    if written < 0:
        if hop:
            _padding_changed([site])
        raise TransitionError(ffi.string(_first_err).decode() + _procfs.exited_main_thread_note())
    if written:
        site.form, site.target, site.hopped = "direct", target, bool(hop)
        if hop:
            site._hop_to = target       # its point filed as written by the C core
    return site


# The sites near an address (native/nearby.c): every site of _sites is
# filed there, with the bytes its entry's jmp replaces and its hot-patch
# point once written; a first redirect asks it within its C call.
_near_out = ffi.new("uint64_t[]", 64)


def _file(site: Site) -> None:
    """File a site made in Python (the C core files those it plans)."""
    if lib.hp_near_file(site.entry, site.plan.address, site.plan.address + site.plan.length):
        raise MemoryError("no memory to file a site")


def _sites_reaching(lo: int, hi: int) -> list[Site]:
    """The sites whose entry writes reach into ``[lo, hi)``."""
    global _near_out
    n = lib.hp_near_entries(lo, hi, _near_out, len(_near_out))
    if n > len(_near_out):
        _near_out = ffi.new("uint64_t[]", 2 * n)
        n = lib.hp_near_entries(lo, hi, _near_out, len(_near_out))
    return [_sites[entry] for entry in _near_out[0:n]]


def restore_batch(sites: Sequence[Site]) -> None:
    """Put the original bytes back at every site (all or nothing).  A thread
    that enters meanwhile runs the original code."""
    update_batch(restores=sites)


def restore(site: Site) -> None:
    """Put the original bytes back at ``site``."""
    restore_batch([site])


def add_observer(site: Site, function, data=ffi.NULL) -> int:
    """Call the C function ``void fn(void *data, uintptr_t address, uint64_t
    *regs)`` on every call through ``site`` (which must be in call form);
    ``regs`` holds rdi, rsi, rdx, rcx, r8, r9, r10, rax.  Returns a handle
    for :func:`remove_observer`."""
    if site.form != "call":
        raise HotpatchError(f"{site.entry:#x}: observers need the call form, not {site.form}")
    handle = lib.hp_call_site_observe(site._call_site, ffi.cast("hp_observer_fn", function), data)
    if handle < 0:
        raise HotpatchError(f"{site.entry:#x}: no room for another observer")
    return handle


def remove_observer(site: Site, handle: int) -> None:
    """Stop calling the observer ``handle`` of ``site``."""
    lib.hp_call_site_unobserve(site._call_site, handle)


def forget(sites: Sequence[Site]) -> None:
    """Drop sites whose object was unloaded, writing nothing (their memory is
    gone, or another object's).  Their pool memory is reused; call-site
    records (caller.c) stay, as they always do."""
    with _lock.operation("forget the sites of an unloaded object"):
        for site in sites:
            if _sites.get(site.entry) is site:
                del _sites[site.entry]
                lib.hp_near_unfile(site.entry)      # and its point
            if site.plan.body is None:
                _free_code.append((site.original,
                                   site._stub_size or original_stub_size_bound(site.plan)))
            if site._slot is not None:
                _free_code.append((site._trampoline, encode.JMP_RIP_INDIRECT_SIZE))
                _free_slots.append(site._slot)
            site.form = site.target = None
            site._slot, site._trampoline = None, 0
            site._hop, site._hop_to, site.hopped = None, 0, False


#: Entries hotpatch's own machinery redirected (the loader hook's r_brk, or
#: its dlopen/dlmopen/dlclose wrappers): not sites of any patch.
_machinery: set[int] = set()


def mark_machinery(site: Site) -> None:
    """``site`` carries hotpatch's own machinery, not a patch: it is left
    out of :func:`installed_sites` (and the tree's counts)."""
    _machinery.add(site.entry)


def installed_sites(*, machinery: bool = False) -> list[Site]:
    """Sites of patches currently redirected, by entry address.  Sites of
    hotpatch's own machinery (the loader hook) only with ``machinery=True``."""
    with _lock.query():
        return sorted((s for s in _sites.values()
                       if s.installed and (machinery or s.entry not in _machinery)),
                      key=lambda s: s.entry)
