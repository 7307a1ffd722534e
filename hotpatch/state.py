"""System states (the kernel's ``struct klp_state``, kernel/livepatch/state.c).

A patch that changes something beyond its functions -- data it allocated,
a setting it turned on -- declares it as a :class:`State` with an id and a
version.  The callbacks of the patches that touch a state share it: a patch
taking over from an older one finds the older one's data with
:meth:`hotpatch.Patch.prev_state`.  An atomic replace must carry on every
state the patches it replaces changed, at the same or a higher version
(Documentation/livepatch/system-state.rst); any patch that names a state an
enabled patch changed must do so at the same or a higher version.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from .errors import PatchStateError

if TYPE_CHECKING:
    from .core import Patch


class State:
    """One system state a patch changes: ``id`` names it, ``version`` says
    which way the patch changes it; ``data`` is the callbacks' to keep."""

    def __init__(self, id: int, version: int = 0, data=None):
        if not isinstance(id, int) or isinstance(id, bool):
            raise TypeError(f"a state id is an integer, not {id!r}")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ValueError(f"state {id}: version must be an integer >= 0, not {version!r}")
        self.id = id
        self.version = version
        self.data = data

    def __repr__(self) -> str:
        return f"<State {self.id} version {self.version}>"


def check_states(patch_name: str, states: Iterable[State]) -> list[State]:
    """The states of a new patch, each id once."""
    states = list(states)
    seen = set()
    for state in states:
        if not isinstance(state, State):
            raise TypeError(f"patch {patch_name!r}: {state!r} is not a hotpatch.State")
        if state.id in seen:
            raise PatchStateError(f"patch {patch_name!r}: state {state.id} listed twice")
        seen.add(state.id)
    return states


def get_state(patch: "Patch", id: int) -> State | None:
    """The state ``id`` of ``patch`` (``klp_get_state``)."""
    return next((s for s in patch.states if s.id == id), None)


def incompatibility(patch: "Patch", enabled: Iterable["Patch"]) -> str | None:
    """Why ``patch`` may not be enabled over the ``enabled`` patches, or None
    (``klp_is_patch_compatible``)."""
    for old in enabled:
        for old_state in old.states:
            state = get_state(patch, old_state.id)
            if state is None and patch.replace:
                return (f"it replaces patch {old.name!r}, which changed state {old_state.id} "
                        f"(version {old_state.version}), and does not carry it on")
            if state is not None and state.version < old_state.version:
                return (f"its state {state.id} is version {state.version}, older than version "
                        f"{old_state.version} of enabled patch {old.name!r}")
    return None


def prev_state(patch: "Patch", id: int, enabled: list["Patch"]) -> State | None:
    """State ``id`` of the newest patch enabled before ``patch``
    (``klp_get_prev_state``): what a patch taking over finds."""
    before = enabled[:enabled.index(patch)] if patch in enabled else enabled
    for old in reversed(before):
        state = get_state(old, id)
        if state is not None:
            return state
    return None
