"""The x86-64 layer: instructions in, bytes out.

``decode`` (capstone) turns machine code into :class:`Instruction` records,
``encode`` is the writer, ``relocate`` the relocator and ``entry`` the
analysis of a function's entry.  Nothing here writes to memory.  capstone's
C library is driven from the C core (``native/decode.c``, ``native/xrefs.c``),
never through its Python binding.
"""

from .decode import (Instruction, decode, decode_one, described, function_branches, iter_decode,
                     sweep)
from .encode import (JMP_REL32_SIZE, JMP_RIP_INDIRECT_SIZE, call_abs, call_rel32,
                     in_reach, jcc_rel32, jmp_abs, jmp_rel32, jmp_rip_indirect, nops)
from .entry import EntryPlan, analyze_entries, analyze_entry, build_original, original_stub_size_bound
from .relocate import check_relocatable, relocate, relocated_size_bound

__all__ = [
    "Instruction", "decode", "decode_one", "described", "function_branches", "iter_decode",
    "sweep",
    "JMP_REL32_SIZE", "JMP_RIP_INDIRECT_SIZE", "call_abs", "call_rel32",
    "in_reach", "jcc_rel32", "jmp_abs", "jmp_rel32", "jmp_rip_indirect", "nops",
    "EntryPlan", "analyze_entries", "analyze_entry", "build_original", "original_stub_size_bound",
    "check_relocatable", "relocate", "relocated_size_bound",
]
