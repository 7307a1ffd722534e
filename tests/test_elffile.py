"""hotpatch.elffile against lief, read as the reference: the symbol tables
(with versions), the relocations hotpatch uses and the build-id of the
system's libraries must come out the same."""
import os
import sysconfig

import lief
import pytest

from hotpatch import elffile

_LIBS = ["/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libm.so.6",
         "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
         os.path.join(sysconfig.get_config_var("LIBDIR") or "",
                      sysconfig.get_config_var("INSTSONAME") or "")]
_USED_RELOCATIONS = {"X86_64_IRELATIVE": 37, "X86_64_GLOB_DAT": 6, "X86_64_JUMP_SLOT": 7,
                     "X86_64_64": 1}


def _lief_version(sym):
    if not sym.has_version or not sym.symbol_version.has_auxiliary_version:
        return None
    marker = "@" if sym.symbol_version.value & 0x8000 else "@@"
    return marker + sym.symbol_version.symbol_version_auxiliary.name


def _lief_symbols(symbols, versioned):
    rows = [(s.name, s.value, s.size, s.type.value & 0xF, s.binding.value, s.visibility.value,
             s.shndx, _lief_version(s) if versioned else None) for s in symbols]
    # lief lists the null symbol at index 0 where elffile leaves it out
    return rows[1:] if rows and rows[0][:3] == ("", 0, 0) else rows


@pytest.mark.parametrize("path", [p for p in _LIBS if os.path.isfile(p)])
def test_tables_match_lief(path):
    reference = lief.ELF.parse(path)
    ours = elffile.open_elf(path)
    assert [tuple(s) for s in ours.dynamic_symbols()] == _lief_symbols(
        reference.dynamic_symbols, versioned=True)
    assert [tuple(s) for s in ours.symtab_symbols()] == _lief_symbols(
        reference.symtab_symbols, versioned=False)
    used = sorted((_USED_RELOCATIONS[r.type.name], r.address, r.addend,
                   r.symbol.name if r.has_symbol and r.symbol.name else None)
                  for relocations in (reference.dynamic_relocations, reference.pltgot_relocations)
                  for r in relocations if r.type.name in _USED_RELOCATIONS)
    assert sorted(r for r in ours.dynamic_relocations()
                  if r.type in _USED_RELOCATIONS.values()) == used
    assert ours.build_id() == next(bytes(n.description) for n in reference.notes
                                   if n.type == lief.ELF.Note.TYPE.GNU_BUILD_ID)


def test_not_elf(tmp_path):
    path = tmp_path / "text"
    path.write_text("not an ELF file")
    assert elffile.open_elf(str(path)) is None
    assert elffile.open_elf(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("path", [p for p in _LIBS if os.path.isfile(p)])
def test_has_dynamic_symbol_and_one_descriptor(path):
    """has_dynamic_symbol answers as a search of the decoded table does
    (it looks at the string table first); inside held_open every read
    shares one descriptor, closed on leaving."""
    ours = elffile.open_elf(path)
    names = {s.name for s in ours.dynamic_symbols()}
    asked = sorted(names)[:20] + ["__fentry__", "mcount", "no_such_symbol_here", "malloc"]
    fresh = elffile.open_elf(path)
    assert {n: fresh.has_dynamic_symbol(n) for n in asked} == {n: n in names for n in asked}
    again = elffile.open_elf(path)
    with again.held_open():
        fd = again._fd
        assert again.dynamic_symbols() == ours.dynamic_symbols()
        assert again._fd == fd and os.fstat(fd)
    assert again._fd is None
    with pytest.raises(OSError):
        os.fstat(fd)
