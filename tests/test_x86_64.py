"""Tests of hotpatch.x86_64: decoding, the writer, the relocator, entry analysis.

The C target tests/x86_targets.c is compiled here in several flavours (one
set of flags per object) into one .so; entries are analysed from the live
bytes of the loaded library, and relocated stubs are run from executable
memory mapped near (and far from) it.
"""

from __future__ import annotations

import ctypes
import shutil
import struct
import subprocess
from pathlib import Path

import lief
import pytest
from keystone import KS_ARCH_X86, KS_MODE_64, Ks

from hotpatch.errors import HotpatchError, UnsafeToPatch
from hotpatch.x86_64 import (JMP_REL32_SIZE, JMP_RIP_INDIRECT_SIZE,
                             analyze_entries, analyze_entry, build_original, call_abs, call_rel32,
                             check_relocatable, decode, decode_one, in_reach,
                             jcc_rel32, jmp_abs, jmp_rel32, nops,
                             original_stub_size_bound, relocate,
                             relocated_size_bound, jmp_rip_indirect)

SOURCE = Path(__file__).with_name("x86_targets.c")
FLAVOURS = {
    "PLAIN": "-O2 -fPIC -fcf-protection=none",
    "FRAMEPTR": "-O2 -fPIC -fcf-protection=none -fno-omit-frame-pointer",
    "IBT": "-O2 -fPIC -fcf-protection",
    "FENTRY_NOP": "-O2 -fno-pic -fcf-protection=none -pg -mfentry -mnop-mcount",
    "FENTRY_CALL": "-O2 -fPIC -fcf-protection=none -pg -mfentry",
    "PATCHABLE": "-O2 -fPIC -fcf-protection=none -fpatchable-function-entry=5",
    "PATCHABLE_IBT": "-O2 -fPIC -fcf-protection -fpatchable-function-entry=5",
}
GiB = 1 << 30
KS = Ks(KS_ARCH_X86, KS_MODE_64)
# A place for synthetic code: nothing runs there.
BASE = 0x7F12_3456_0000


def ks(text: str, address: int) -> bytes:
    return bytes(KS.asm(text, address)[0])


# --- the target library ------------------------------------------------------

class Target:
    """The loaded target library: symbols, sizes, segments, raw bytes."""

    def __init__(self, path: Path):
        self.cdll = ctypes.CDLL(str(path))
        elf = lief.parse(str(path))
        # Plain values: lief's objects do not outlive the parsed binary.
        self.symbols = {s.name: (s.value, s.size) for s in elf.symbols
                        if s.name.startswith("x86t_")}
        self.base = (ctypes.cast(self.cdll.x86t_counter_plus, ctypes.c_void_p).value
                     - self.symbols["x86t_counter_plus"][0])
        self.exec_ranges = [(self.base + seg.virtual_address,
                             self.base + seg.virtual_address + seg.virtual_size)
                            for seg in elf.segments
                            if seg.type == lief.ELF.Segment.TYPE.LOAD
                            and seg.has(lief.ELF.Segment.FLAGS.X)]
        got_slots = {self.base + r.address for r in elf.relocations
                     if r.has_symbol and r.symbol.name == "__fentry__"}
        libc = ctypes.CDLL(None)
        fentry = ctypes.cast(libc["__fentry__"], ctypes.c_void_p).value
        self.fentry_targets = got_slots | {fentry}

    def addr(self, name: str) -> int:
        return self.base + self.symbols[name][0]

    def size(self, name: str) -> int:
        return self.symbols[name][1]

    def func(self, name: str, nargs: int):
        fn = getattr(self.cdll, name)
        fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int] * nargs
        return fn

    def analyze(self, name: str, *, sized: bool = True, fentry: bool = True):
        return analyze_entry(ctypes.string_at, self.addr(name),
                             size=self.size(name) if sized else None,
                             exec_ranges=self.exec_ranges,
                             fentry_targets=self.fentry_targets if fentry else ())


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> Target:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("x86_targets")
    objects = []
    for flavour, flags in FLAVOURS.items():
        obj = out / f"{flavour.lower()}.o"
        subprocess.run([cc, *flags.split(), f"-DX86T_{flavour}", "-c", str(SOURCE),
                        "-o", str(obj)], check=True)
        objects.append(str(obj))
    so = out / "libx86_targets.so"
    subprocess.run([cc, "-shared", "-o", str(so), *objects], check=True)
    return Target(so)


# --- executable memory for stubs ----------------------------------------------

class Arena:
    """An anonymous RWX mapping; stubs are laid out one after another."""

    PROT_RWX, MAP_PRIVATE_ANON, SIZE = 7, 0x22, 1 << 16

    def __init__(self, libc, address: int):
        self.libc, self.start, self.next = libc, address, address

    @classmethod
    def near(cls, anchor: int, distance_ok, hints):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        for hint in hints:
            address = libc.mmap(hint, cls.SIZE, cls.PROT_RWX, cls.MAP_PRIVATE_ANON, -1, 0)
            if address in (None, ctypes.c_void_p(-1).value):
                continue
            if distance_ok(abs(address - anchor)):
                return cls(libc, address)
            libc.munmap(address, cls.SIZE)
        pytest.skip("could not map memory at the wanted distance")

    def place(self, plan, builder=build_original):
        address = self.next
        code = builder(plan, address)
        assert len(code) <= original_stub_size_bound(plan)
        ctypes.memmove(address, code, len(code))
        self.next = (address + len(code) + 15) & ~15
        return address, code

    def close(self):
        self.libc.munmap(self.start, self.SIZE)


@pytest.fixture(scope="module")
def near(lib):
    hints = [lib.base - i * (64 << 20) for i in range(1, 16)] + \
            [lib.base + i * (64 << 20) for i in range(1, 16)]
    arena = Arena.near(lib.base, lambda d: d < GiB, hints)
    yield arena
    arena.close()


@pytest.fixture(scope="module")
def far(lib):
    hints = [lib.base - i * (16 * GiB) for i in range(1, 8)] + [0x1000_0000_0000, 0x2000_0000]
    arena = Arena.near(lib.base, lambda d: d > 4 * GiB, hints)
    yield arena
    arena.close()


def call(address: int, nargs: int, *args):
    proto = ctypes.CFUNCTYPE(ctypes.c_int, *[ctypes.c_int] * nargs)
    return proto(address)(*args)


# --- the writer --------------------------------------------------------------

@pytest.mark.parametrize("delta", [0x1000, -0x1000, 0x200, -0x7FFF_0000, 0x7FFF_0000])
def test_rel32_branches_match_keystone(delta):
    src, dst = BASE, BASE + delta
    assert jmp_rel32(src, dst) == ks(f"jmp {dst:#x}", src)
    assert call_rel32(src, dst) == ks(f"call {dst:#x}", src)


@pytest.mark.parametrize("cc,mnemonic", list(enumerate(
    "jo jno jb jae je jne jbe ja js jns jp jnp jl jge jle jg".split())))
def test_jcc_rel32_matches_keystone(cc, mnemonic):
    dst = BASE - 0x3000
    assert jcc_rel32(cc, BASE, dst) == ks(f"{mnemonic} {dst:#x}", BASE)


def test_reach_limits():
    end = BASE + JMP_REL32_SIZE
    assert in_reach(BASE, end + (1 << 31) - 1) and not in_reach(BASE, end + (1 << 31))
    assert in_reach(BASE, end - (1 << 31)) and not in_reach(BASE, end - (1 << 31) - 1)
    assert in_reach(BASE, end + (1 << 31) - 1 + 1, size=6)
    with pytest.raises(ValueError):
        jmp_rel32(BASE, BASE + 4 * GiB)
    with pytest.raises(ValueError):
        jcc_rel32(0x10, BASE, BASE)


def test_absolute_forms_match_keystone():
    target = 0x1122_3344_5566_7788
    assert jmp_abs(target) == ks("jmp qword ptr [rip]", 0) + struct.pack("<Q", target)
    code = call_abs(target)
    assert len(code) == 16 and code[:6] == ks("call qword ptr [rip + 2]", 0)
    assert code[6:8] == ks("jmp 0x10", 6)              # over the stored target
    assert code[8:] == struct.pack("<Q", target)


def test_jmp_rip_indirect():
    src, slot = 0x7F00_0000_1000, 0x7F00_0001_0008
    code = jmp_rip_indirect(src, slot)
    assert len(code) == JMP_RIP_INDIRECT_SIZE
    assert code == ks(f"jmp qword ptr [rip + {slot - src - JMP_RIP_INDIRECT_SIZE}]", src)
    with pytest.raises(ValueError):
        jmp_rip_indirect(src, src + (1 << 40))


@pytest.mark.parametrize("n", range(0, 30))
def test_nops(n):
    code = nops(n)
    insns = decode(code, BASE)
    assert len(code) == n and sum(i.size for i in insns) == n
    assert all(i.is_nop() for i in insns) and len(insns) == -(-n // 9)


def test_nops_are_the_sdm_forms():
    # Keystone assembles multi-byte NOPs as 0F 18 prefetch hints, so compare
    # with the SDM's table itself.
    sdm = ["90", "6690", "0f1f00", "0f1f4000", "0f1f440000", "660f1f440000",
           "0f1f8000000000", "0f1f840000000000", "660f1f840000000000"]
    assert [nops(n).hex() for n in range(1, 10)] == sdm


# --- decoding ----------------------------------------------------------------

def test_decode_branches_and_rip_operands():
    code = bytes.fromhex("e3 02 e2 fe 74 10 e8 00000000 ff 15 02000000 "
                         "ff e0 c3 c7 f8 00000000 c7 05 10000000 34120000 cc 06".replace(" ", ""))
    insns = decode(code, BASE)
    kinds = [(i.branch, i.target and i.target - BASE) for i in insns]
    assert kinds == [("loop", 4), ("loop", 2), ("jcc", 0x16), ("call", 0xB),
                     ("call_indirect", None), ("jmp_indirect", None), ("ret", None),
                     ("xbegin", 0x1A), (None, None), (None, None)]
    assert insns[-1].mnemonic == "int3" and insns[-1].is_padding()
    assert insns[-1].end == BASE + len(code) - 1         # stopped at the invalid 06
    store = insns[-2]
    assert store.rip_disp_offset == 2 and store.rip_target == store.end + 0x10
    assert insns[4].rip_target == insns[4].end + 2
    assert decode_one(b"\x06", BASE) is None


def test_rip_disp_offset_after_prefixes():
    # 66 and VEX prefixes, where capstone misreports disp_size.
    for text in ("mov word ptr [rip + 0x100], 0x1234", "vmovdqa xmm0, xmmword ptr [rip + 0x100]",
                 "lock add dword ptr [rip + 0x100], 1"):
        insn = decode_one(ks(text, BASE), BASE)
        disp = int.from_bytes(insn.raw[insn.rip_disp_offset:insn.rip_disp_offset + 4], "little")
        assert disp == 0x100 and insn.rip_target == insn.end + 0x100, text


@pytest.mark.parametrize("hexcode", ["90", "6690", "0f1f00", "0f1f440000", "660f1f840000000000",
                                     "66662e0f1f840000000000"])
def test_nop_forms(hexcode):
    insn = decode_one(bytes.fromhex(hexcode), BASE)
    assert insn.is_nop() and insn.size == len(hexcode) // 2


# --- the relocator (synthetic code, checked by decoding the output) ----------

def moved(text: str, stub: int, *, resume=True, src=BASE):
    code = ks(text, src)
    insns = decode(code, src)
    out = relocate(insns, stub, resume=src + len(code) if resume else None,
                   region=(src, src + len(code)))
    assert len(out) <= relocated_size_bound(insns)
    return insns, decode(out, stub), out


def test_relocate_short_jcc_near_and_far():
    target = BASE + 0x40
    _, near, _ = moved(f"je {target:#x}; nop; nop; nop", BASE + 0x10000)
    assert near[0].raw[:2] == b"\x0f\x84" and near[0].target == target
    assert near[-1].branch == "jmp" and near[-1].target == BASE + 5
    stub = BASE + 8 * GiB
    _, far, out = moved(f"je {target:#x}; nop; nop; nop", stub)
    assert far[0].mnemonic == "jne" and far[0].target == far[1].address + 14  # over the jmp_abs
    assert out[2:16] == jmp_abs(target)
    assert out.endswith(jmp_abs(BASE + 5))


def test_relocate_jmp_call_rip():
    _, out, _ = moved("jmp 0x7f1234560040", BASE + 0x100000, resume=False)
    assert len(out) == 1 and out[0].raw[0] == 0xE9 and out[0].target == BASE + 0x40
    _, out, code = moved("call 0x7f1234560040", BASE + 8 * GiB)
    assert code[:16] == call_abs(BASE + 0x40)
    _, out, _ = moved("mov dword ptr [rip + 0x100], 0x1234", BASE + 0x100000)
    assert out[0].rip_target == BASE + 10 + 0x100 and out[0].op_str.endswith("0x1234")
    with pytest.raises(UnsafeToPatch, match=r"beyond ±2 GiB of its new place at 0x"):
        moved("mov eax, dword ptr [rip + 0x100]", BASE + 8 * GiB)


@pytest.mark.parametrize("mnemonic", ["jrcxz", "jecxz", "loop", "loope", "loopne"])
@pytest.mark.parametrize("distance", [0x100000, 8 * GiB])
def test_relocate_loop_family(mnemonic, distance):
    stub = BASE + distance
    insns, out, code = moved(f"{mnemonic} 0x7f1234560030; nop; nop; nop", stub)
    # <insn> +2; jmp short over; jmp target; nops; jmp back
    assert out[0].mnemonic == mnemonic and out[0].raw[:-1] == insns[0].raw[:-1]
    assert out[0].target == out[1].end
    if distance < GiB:
        assert out[1].target == out[2].end and out[2].target == BASE + 0x30
    else:
        assert out[1].target == out[2].address + 14
        assert code[out[2].address - stub:][:14] == jmp_abs(BASE + 0x30)


def test_relocate_maps_targets_inside_the_region():
    insns, out, _ = moved("push rbx; dec edi; jg 0x7f1234560001; ret", BASE + 8 * GiB, resume=False)
    jg = next(i for i in out if i.mnemonic == "jg")
    assert jg.target == out[1].address


def test_relocate_refuses_mid_instruction_target():
    code = bytes.fromhex("eb02b801000000")          # jmp into the mov's immediate
    insns = decode(code, BASE)
    with pytest.raises(UnsafeToPatch, match=r"at 0x7f1234560000 targets 0x7f1234560004, .* "
                                            r"not at an instruction boundary"):
        relocate(insns, BASE + 0x1000, resume=BASE + 7, region=(BASE, BASE + 7))


def test_relocate_refuses_call_into_region_and_xbegin():
    insns = decode(bytes.fromhex("e80000000058"), BASE)    # call next; pop rax
    with pytest.raises(UnsafeToPatch, match="return address in the stub"):
        check_relocatable(insns, (BASE, BASE + 6))
    insns = decode(bytes.fromhex("c7f8fa000000"), BASE)      # xbegin +0xfa
    with pytest.raises(UnsafeToPatch, match=r"xbegin at 0x7f1234560000"):
        relocate(insns, BASE + 0x1000, resume=BASE + 6, region=(BASE, BASE + 6))


def test_relocate_needs_a_resume_when_falling_through():
    insns = decode(b"\x90" * 5, BASE)
    with pytest.raises(ValueError):
        relocate(insns, BASE + 0x1000, resume=None, region=(BASE, BASE + 5))


# --- entry analysis: kinds ---------------------------------------------------

def test_fentry_nop(lib):
    entry = lib.addr("x86t_fentry_nop_add")
    plan = lib.analyze("x86t_fentry_nop_add")
    assert (plan.kind, plan.address, plan.length, plan.body) == ("fentry", entry, 5, entry + 5)
    assert plan.single_instruction and not plan.endbr
    assert plan.original_bytes == bytes.fromhex("0f1f440000")
    assert call(plan.body, 2, 4, 5) == lib.func("x86t_fentry_nop_add", 2)(4, 5) == 17
    assert original_stub_size_bound(plan) == 0
    with pytest.raises(ValueError):
        build_original(plan, 0x1000)


def test_fentry_call(lib):
    entry = lib.addr("x86t_fentry_call_add")
    plan = lib.analyze("x86t_fentry_call_add")
    assert (plan.kind, plan.address, plan.length, plan.body) == ("fentry", entry, 6, entry + 6)
    assert plan.original_bytes[:2] == b"\xff\x15" and plan.single_instruction
    assert call(plan.body, 2, 4, 5) == lib.func("x86t_fentry_call_add", 2)(4, 5) == 17
    # Not told it is a fentry call: an ordinary instruction to relocate.
    assert lib.analyze("x86t_fentry_call_add", fentry=False).kind == "generic"


@pytest.mark.parametrize("name,endbr", [("x86t_patchable_add", False),
                                        ("x86t_patchable_ibt_add", True)])
def test_patchable_nops(lib, name, endbr):
    entry = lib.addr(name)
    address = entry + 4 * endbr
    plan = lib.analyze(name)
    assert (plan.kind, plan.endbr, plan.address, plan.length) == ("nops", endbr, address, 5)
    assert plan.body == address + 5 and len(plan.instructions) == 5
    assert not plan.single_instruction and plan.original_bytes == b"\x90" * 5
    assert call(plan.body, 2, 2, 1) == 7


# --- entry analysis: generic entries, run from relocated stubs -----------------

# name, arity, argument tuples, expected (address - entry, length, single_instruction)
GENERIC = [
    ("x86t_counter_plus", 1, [(5,), (-7,)], (0, 6, True)),
    ("x86t_nofp_sum", 2, [(3, 4)], (0, 8, False)),
    ("x86t_fp_sum", 2, [(3, 4)], (0, 5, False)),
    ("x86t_ibt_counter_plus", 1, [(5,)], (4, 6, True)),
    ("x86t_jcc_entry", 1, [(5,), (-3,)], (0, 7, False)),
    ("x86t_in_region_loop", 1, [(5,), (-3,)], (0, 5, False)),
    ("x86t_call_entry", 1, [(5,)], (0, 5, True)),
    ("x86t_tailjmp", 1, [(5,)], (0, 5, True)),
    ("x86t_short_jmp", 1, [(5,)], (0, 6, False)),
    ("x86t_jrcxz", 4, [(1, 0, 0, 0), (1, 0, 0, 5)], (0, 9, False)),
    ("x86t_loop", 4, [(3, 0, 0, 4)], (0, 6, False)),
    ("x86t_store_imm", 1, [(5,)], (0, 10, True)),
    ("x86t_table_get", 1, [(3,), (12,)], (0, 10, False)),
    ("x86t_tiny4", 2, [(3, 4)], (0, 5, False)),
    ("x86t_ibt_zero", 0, [()], (4, 5, False)),
]


@pytest.mark.parametrize("name,nargs,argsets,shape", GENERIC, ids=[g[0] for g in GENERIC])
def test_generic_stub_near(lib, near, name, nargs, argsets, shape):
    entry = lib.addr(name)
    plan = lib.analyze(name)
    assert plan.kind == "generic" and plan.body is None
    assert (plan.address - entry, plan.length, plan.single_instruction) == shape
    assert plan.endbr == (shape[0] == 4)
    assert plan.original_bytes == ctypes.string_at(plan.address, plan.length)
    stub, code = near.place(plan)
    assert code.startswith(b"\xf3\x0f\x1e\xfa") == plan.endbr
    function = lib.func(name, nargs)
    for args in argsets:
        assert call(stub, nargs, *args) == function(*args), args


FAR_OK = [g for g in GENERIC if g[0] not in
          ("x86t_counter_plus", "x86t_ibt_counter_plus", "x86t_store_imm", "x86t_table_get")]


@pytest.mark.parametrize("name,nargs,argsets,shape", FAR_OK, ids=[g[0] for g in FAR_OK])
def test_generic_stub_far(lib, far, name, nargs, argsets, shape):
    plan = lib.analyze(name)
    stub, code = far.place(plan)
    function = lib.func(name, nargs)
    for args in argsets:
        assert call(stub, nargs, *args) == function(*args), args


def test_rip_relative_stub_sees_the_same_global(lib, near):
    stub, _ = near.place(lib.analyze("x86t_counter_plus"))
    lib.cdll.x86t_set_counter(1000)
    assert call(stub, 1, 5) == 1005


def test_loop_in_region_runs_in_the_stub(lib, near):
    plan = lib.analyze("x86t_in_region_loop")
    stub, code = near.place(plan)
    jg = next(i for i in decode(code, stub) if i.mnemonic == "jg")
    assert stub <= jg.target < stub + len(code)


def test_padding_after_tiny_functions(lib, near):
    entry = lib.addr("x86t_tiny_ret")
    plan = lib.analyze("x86t_tiny_ret")
    assert (plan.kind, plan.address, plan.length) == ("generic", entry, 5)
    assert [i.mnemonic for i in plan.instructions] == ["ret"] and not plan.falls_through
    assert plan.original_bytes == b"\xc3" + b"\xcc" * 4
    stub, code = near.place(plan)
    assert code == b"\xc3"
    ctypes.CFUNCTYPE(None)(stub)()
    plan = lib.analyze("x86t_ibt_zero")                   # endbr64; xor; ret; nopw
    assert plan.endbr and plan.address == plan.entry + 4 and not plan.falls_through


def test_unsized_entries(lib):
    plan = lib.analyze("x86t_counter_plus", sized=False)
    assert (plan.kind, plan.length, plan.falls_through) == ("generic", 6, True)
    with pytest.raises(UnsafeToPatch, match=r"ret.* cannot be told apart from the next function"):
        lib.analyze("x86t_tiny_ret", sized=False)


# --- entry analysis: refusals ------------------------------------------------

REFUSALS = [
    ("x86t_tiny_nopad", r"function at 0x[0-9a-f]+ is 4 bytes, too short .* no padding "
                        r"follows it: 0x[0-9a-f]+: mov eax, 1 is not int3/nop"),
    ("x86t_back_into_entry", r"a branch lands inside the replaced bytes \[0x[0-9a-f]+, "
                             r"0x[0-9a-f]+\): 0x[0-9a-f]+: jg 0x[0-9a-f]+ goes to 0x[0-9a-f]+"),
    ("x86t_into_sled", r"a branch lands inside the replaced bytes .*jg 0x[0-9a-f]+ goes to"),
    ("x86t_call_mid", r"call at 0x[0-9a-f]+ returns to 0x[0-9a-f]+, inside the replaced bytes"),
    ("x86t_xbegin", r"xbegin at 0x[0-9a-f]+: a transaction's abort handler"),
    ("x86t_int3", r"int3 at 0x[0-9a-f]+: a breakpoint is already set there"),
    ("x86t_undecodable", r"cannot decode the instruction at 0x[0-9a-f]+: undecodable bytes 06"),
]


@pytest.mark.parametrize("name,reason", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals(lib, name, reason):
    with pytest.raises(UnsafeToPatch, match=reason) as info:
        lib.analyze(name)
    assert f"{lib.addr(name):#x}" in str(info.value)


def test_a_batch_analysis_is_the_analysis_of_each(lib):
    """analyze_entries (the bytes read and decoded in one C call) plans and
    refuses exactly as analyze_entry does, function by function, in order."""
    names = sorted(lib.symbols)
    functions = [(lib.addr(n), lib.size(n)) for n in names]
    functions.append((lib.addr("x86t_tiny4"), None))        # an unsized entry
    batch = analyze_entries(functions, exec_ranges=lib.exec_ranges,
                            fentry_targets=lib.fentry_targets)
    assert len(batch) == len(functions)
    for (entry, size), got in zip(functions, batch):
        try:
            want = analyze_entry(ctypes.string_at, entry, size=size, exec_ranges=lib.exec_ranges,
                                 fentry_targets=lib.fentry_targets)
        except UnsafeToPatch as e:
            assert isinstance(got, UnsafeToPatch) and str(got) == str(e), hex(entry)
        else:
            assert got == want, hex(entry)
    refused = {n for n, r in zip(names, batch) if isinstance(r, UnsafeToPatch)}
    assert {name for name, _ in REFUSALS} <= refused


def test_a_batch_analysis_reports_unmapped_bytes(lib):
    gone = BASE      # nothing is mapped there
    plans = analyze_entries([(lib.addr("x86t_counter_plus"), lib.size("x86t_counter_plus")),
                             (gone, 16)])
    assert plans[0] == lib.analyze("x86t_counter_plus")
    assert type(plans[1]) is HotpatchError
    assert str(plans[1]) == f"{gone:#x}: 24 bytes there are not mapped"


def test_entries_read_together_are_told_apart_where_one_is_not_mapped():
    """Entries close together are read as one span: where the span runs into
    an unmapped page, each entry is still told mapped or not on its own."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = 4096
    base = libc.mmap(None, 2 * page, 3, 0x22, -1, 0)      # read/write, private anonymous
    assert base not in (None, ctypes.c_void_p(-1).value)
    try:
        ctypes.memset(base, 0xC3, page)                    # ret: each entry decodes
        assert libc.munmap(base + page, page) == 0
        entries = [base + page - 64, base + page - 40, base + page - 20, base + page + 8]
        plans = analyze_entries([(entry, 1) for entry in entries])
        assert [type(p) is HotpatchError and "not mapped" in str(p) for p in plans] \
            == [False, False, True, True], plans
    finally:
        libc.munmap(base, 2 * page)


def test_refuses_data(lib):
    data = lib.addr("x86t_data")
    with pytest.raises(UnsafeToPatch, match=rf"not code: {data:#x} is not inside an "
                                            r"executable segment"):
        analyze_entry(ctypes.string_at, data, size=4, exec_ranges=lib.exec_ranges)
    lo, hi = next(r for r in lib.exec_ranges if r[0] <= lib.addr("x86t_tiny4") < r[1])
    with pytest.raises(UnsafeToPatch, match=r"runs past the end of its executable segment"):
        analyze_entry(ctypes.string_at, lib.addr("x86t_tiny4"), size=4,
                      exec_ranges=[(lo, lib.addr("x86t_tiny4") + 4)])


def test_refuses_rip_operand_out_of_reach(lib, far):
    plan = lib.analyze("x86t_counter_plus")
    with pytest.raises(UnsafeToPatch, match=r"refers to 0x[0-9a-f]+, beyond ±2 GiB"):
        build_original(plan, far.next)


def memory(code: bytes):
    """A read() over synthetic code at BASE, followed by int3s."""
    image = code + b"\xcc" * 64
    return lambda address, n: image[address - BASE:address - BASE + n]


@pytest.mark.parametrize("hexcode,size,reason", [
    ("8d0437" "b801000000" "06c3", 10, r"cannot decode the function at 0x7f1234560000 up "
                                       r"to its end 0x7f123456000a \(undecodable bytes at "
                                       r"0x7f1234560008\)"),
    ("8d0437" "b801000000", 5, r"0x7f1234560003: mov eax, 1 crosses the end of the "
                               r"function at 0x7f1234560005"),
    ("8d0437", 3, r"function at 0x7f1234560000 is 3 bytes, too short .* falls through"),
])
def test_refusals_on_synthetic_code(hexcode, size, reason):
    with pytest.raises(UnsafeToPatch, match=reason):
        analyze_entry(memory(bytes.fromhex(hexcode)), BASE, size=size)


def test_synthetic_code_without_exec_ranges():
    plan = analyze_entry(memory(bytes.fromhex("0f1f440000c3")), BASE)
    assert (plan.kind, plan.body) == ("fentry", BASE + 5)
    plan = analyze_entry(memory(bytes.fromhex("e9fb0f0000")), BASE)
    assert plan.kind == "generic" and not plan.falls_through
