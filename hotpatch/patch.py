"""Per-function stacks of Funcs on their sites (the kernel's klp_ops).

Every patched function has one site and one stack of :class:`~hotpatch.Func`;
the top of the stack is where calls go.  A change of several stacks -- the
funcs of a patch pushed, popped, or an atomic replace that does both -- is
computed on copies and then written as one batch of code writes: the first
push installs a site, the last pop restores it, anything else rewrites at
most the one instruction (or slot) at the entry.  If the batch fails nothing
changes, here or in memory.  Around the batch, the PLT slots bound to the
functions follow their tops (:mod:`hotpatch.plt`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from . import plt, sites

if TYPE_CHECKING:
    from .core import Func


@dataclass(eq=False)
class FuncStack:
    """The funcs redirecting one function, bottom first (klp_ops.func_stack)."""

    site: sites.Site
    funcs: list = field(default_factory=list)

    @property
    def top(self) -> "Func | None":
        return self.funcs[-1] if self.funcs else None


_stacks: dict[int, FuncStack] = {}   # by the function's address


def entry_target(func: "Func") -> int:
    """Where calls go while ``func`` is on top: its thunk, if it has one."""
    return func.thunk.address if func.thunk is not None else func.new_addr


def plt_target(site: sites.Site | None, funcs: list) -> int | None:
    """Where the PLT slots bound to the function go: the top's new code
    (PLT callers assume only the ABI, so never its thunk); None -- they keep
    the entry -- when nothing is patched or observers must see the calls."""
    if not funcs or site.form == "call":
        return None
    return funcs[-1].new_addr


def stack_of(address: int) -> FuncStack | None:
    """The stack of the function at ``address``, if it is patched."""
    return _stacks.get(address)


def _new_stacks(push: Iterable["Func"], pop: Iterable["Func"]) -> dict[int, list]:
    """The stacks after popping ``pop`` and pushing ``push`` (on copies)."""
    changed: dict[int, list] = {}

    def funcs_of(func):
        if func.old_addr not in changed:
            stack = _stacks.get(func.old_addr)
            changed[func.old_addr] = list(stack.funcs) if stack else []
        return changed[func.old_addr]

    for func in pop:
        funcs_of(func).remove(func)
    for func in push:
        funcs_of(func).append(func)
    return changed


def patch_funcs(push: Iterable["Func"] = (), pop: Iterable["Func"] = (),
                prepared: dict[int, sites.Site] | None = None, unreachable=None,
                transition=None) -> None:
    """Pop the funcs of ``pop`` from their stacks and push those of ``push``
    (their sites prepared in ``prepared``, by address, for functions not yet
    patched), in one batch of code writes.  All or nothing.  ``unreachable``
    writes into an object still being loaded (see :func:`sites.update_batch`);
    ``transition`` (the stack model) decides when the batch may be written."""
    push, pop = list(push), list(pop)
    changed = _new_stacks(push, pop)
    before = [(func, func._original) for func in push]
    for func in push:
        # Before the write: the new code may call its original as soon as
        # the redirect is live, from any thread.
        stack = _stacks.get(func.old_addr)
        func._original = (stack.site if stack else prepared[func.old_addr]).original
        if func._publish_original is not None:
            func._publish_original(func._original)
    redirects, restores, moved = [], [], []
    for address, funcs in changed.items():
        stack = _stacks.get(address)
        site = stack.site if stack else prepared[address]
        if funcs and (stack is None or stack.top is not funcs[-1]):
            redirects.append((site, entry_target(funcs[-1])))
            moved.append(address)
        elif not funcs and stack is not None:
            restores.append(site)
            moved.append(address)
    try:
        # PLT slots go back to the entries first (right whatever the entries
        # do), and follow the new tops once the entries are written.
        plt.park(moved)
        sites.update_batch(redirects, restores, unreachable=unreachable, transition=transition)
    except BaseException:
        for func, original in before:
            func._original = original
        plt.settle()
        raise
    for address, funcs in changed.items():
        if funcs:
            if address not in _stacks:
                _stacks[address] = FuncStack(prepared[address])
            _stacks[address].funcs = funcs
        else:
            _stacks.pop(address, None)
    for func in pop:
        func._site = None
    for func in push:
        func._site = _stacks[func.old_addr].site
    plt.settle({address: plt_target(_stacks[address].site if funcs else None, funcs)
                for address, funcs in changed.items()})



def drop_funcs(funcs: Iterable["Func"]) -> None:
    """Take ``funcs`` off their stacks without writing anything: their object
    was unloaded.  Sites left with no func are forgotten (see
    :func:`sites.forget`); a later load of the object, at any address, gets
    new ones."""
    gone = []
    for func in funcs:
        stack = _stacks.get(func.old_addr)
        if stack is not None and func in stack.funcs:
            stack.funcs.remove(func)
            if not stack.funcs:
                gone.append(_stacks.pop(func.old_addr).site)
        func._site = None
    sites.forget(gone)
