"""Per-function stacks of Funcs on their sites (the kernel's klp_ops).

Every patched function has one site and one stack of :class:`~hotpatch.Func`;
the top of the stack is where calls go.  A change of several stacks -- the
funcs of a patch pushed, popped, or an atomic replace that does both -- is
computed on copies and then written as one batch of code writes: the first
push installs a site, the last pop restores it, anything else rewrites at
most the one instruction (or slot) at the entry.  If the batch fails nothing
changes, here or in memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from . import sites

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
                prepared: dict[int, sites.Site] | None = None, transition=None) -> None:
    """Pop the funcs of ``pop`` from their stacks and push those of ``push``
    (their sites prepared in ``prepared``, by address, for functions not yet
    patched), in one batch of code writes.  All or nothing.  ``transition``
    (the stack model) decides when the batch may be written."""
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
    redirects, restores = [], []
    for address, funcs in changed.items():
        stack = _stacks.get(address)
        site = stack.site if stack else prepared[address]
        if funcs and (stack is None or stack.top is not funcs[-1]):
            redirects.append((site, entry_target(funcs[-1])))
        elif not funcs and stack is not None:
            restores.append(site)
    try:
        sites.update_batch(redirects, restores, transition=transition)
    except BaseException:
        for func, original in before:
            func._original = original
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

