"""Tests of hotpatch.symbols: loaded objects and ELF symbol resolution.

Resolution writes no code, so everything runs in-process.  Test libraries
are compiled from tests/symbols_targets/ at test time and loaded with ctypes
under unique paths; readelf is the independent oracle for what a file holds.
Objects nobody here wrote are checked too: libz (stripped), a CPython
extension module, libpython, libc and the main program.
"""

import ctypes
import os
import re
import shutil
import subprocess
import sys
import zlib  # noqa: F401  (loads libz.so.1)
import _json

import pytest

from conftest import compile_library
from hotpatch import elf, symbols
from hotpatch.errors import AmbiguousSymbol, HotpatchError, SymbolNotFound, UnsafeToPatch


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def cc(out, *sources, flags=(), pic=True):
    """Compile test sources from symbols_targets/ into the shared library ``out``."""
    sources = [f"symbols_targets/{s}" for s in sources]
    return compile_library(out, sources, flags,
                           per_source_flags=None if pic else {s: [] for s in sources})


def load(path):
    """Load ``path`` with ctypes and return it as a LoadedObject."""
    ctypes.CDLL(path)
    obj = symbols.find_object(path)
    assert obj is not None, path
    return obj


def run(*command, cwd=None):
    subprocess.run([str(c) for c in command], check=True, capture_output=True, cwd=cwd)


_SYMBOL_LINE = re.compile(
    r"^\s*\d+: ([0-9a-f]+)\s+(\S+)\s+(\w+)\s+\w+\s+\w+\s+\S+\s+(\S+)$")


def readelf_functions(path, table=".symtab"):
    """[(name, value, size)] of the FUNC/IFUNC symbols of ``table``, in order."""
    out = subprocess.run(["readelf", "-sW", path], check=True, capture_output=True,
                         text=True).stdout
    functions, inside = [], False
    for line in out.splitlines():
        if line.startswith("Symbol table"):
            inside = f"'{table}'" in line
            continue
        m = _SYMBOL_LINE.match(line)
        if inside and m and m.group(3) in ("FUNC", "IFUNC") and int(m.group(1), 16):
            name = m.group(4).partition("@")[0]  # .dynsym names carry versions
            functions.append((name, int(m.group(1), 16), int(m.group(2), 0)))
    return functions


def readelf_value(path, name, table=".symtab"):
    values = [v for n, v, _ in readelf_functions(path, table) if n == name]
    assert len(values) == 1, (name, values)
    return values[0]


def readelf_build_id(path):
    out = subprocess.run(["readelf", "-n", path], check=True, capture_output=True,
                         text=True).stdout
    m = re.search(r"Build ID: ([0-9a-f]+)", out)
    return bytes.fromhex(m.group(1)) if m else None


def strip_with_debug_file(lib, debug):
    """Move ``lib``'s symbols into ``debug`` (objcopy --only-keep-debug), then strip it."""
    run("objcopy", "--only-keep-debug", lib, debug)
    run("strip", "--strip-all", lib)
    assert readelf_functions(lib) == []


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return tmp_path_factory.mktemp("symbols")


@pytest.fixture(autouse=True)
def restore_debug_dirs():
    saved = symbols.debug_dirs()
    yield
    if symbols.debug_dirs() != saved:
        symbols.set_debug_dirs(saved)


@pytest.fixture
def no_debug_files(tmp_path):
    """Search debug files only in an empty folder."""
    symbols.set_debug_dirs([str(tmp_path / "no-debug")])


# --------------------------------------------------------------------------
# Loaded objects
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def described(build):
    path = cc(build / "libdescribed.so", "dup_a.c", flags=["-g", "-Wl,-soname,libdescribed.so.1"])
    return path, load(path)


def test_loaded_object_is_described_from_its_mapped_image(described):
    path, obj = described
    assert obj.name == path and obj.path == os.path.realpath(path)
    assert obj.basename == "libdescribed.so"
    assert obj.soname == "libdescribed.so.1"
    assert obj.build_id == readelf_build_id(path)
    address = obj.base + readelf_value(path, "dup_a")
    assert any(lo <= address < hi for lo, hi in obj.exec_ranges)
    assert str(obj) == "libdescribed.so"


def test_object_found_by_basename_soname_and_absolute_path(described, build):
    path, obj = described
    link = build / "described-link.so"
    link.symlink_to(path)
    for name in ("libdescribed.so", "libdescribed.so.1", path, str(link)):
        assert symbols.find_object(name) == obj, name
    assert symbols.find_object("libdescribed") is None
    assert symbols.find_object("libnot-loaded.so") is None


def test_two_objects_matching_one_name_is_an_error_listing_both(build):
    paths = []
    for folder in ("one", "two"):
        (build / folder).mkdir()
        paths.append(cc(build / folder / "libtwin.so", "dup_b.c", flags=["-Wl,-soname,libtwin.so"]))
        ctypes.CDLL(paths[-1])
    with pytest.raises(HotpatchError) as error:
        symbols.find_object("libtwin.so")
    assert "libtwin.so" in str(error.value)
    assert paths[0] in str(error.value) and paths[1] in str(error.value)
    assert symbols.find_object(paths[1]).path == paths[1]


def test_main_program_is_object_none():
    obj = symbols.find_object(None)
    assert obj.name is None
    assert obj.path == os.path.realpath("/proc/self/exe") == os.path.realpath(sys.executable)
    assert obj.build_id == readelf_build_id(obj.path)
    main = symbols.resolve(obj, "main")
    assert main.address == obj.base + readelf_value(obj.path, "main")
    assert str(obj).startswith("main program ")


def test_vdso_is_left_out():
    assert all("vdso" not in o.basename for o in symbols.loaded_objects())
    assert all(os.path.exists(o.path) for o in symbols.loaded_objects())


# --------------------------------------------------------------------------
# Symbol tables: sympos, clones, not found
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dup(build):
    path = cc(build / "libdup.so", "dup_a.c", "dup_b.c")
    return path, load(path)


def test_same_static_name_in_two_units_is_ambiguous(dup):
    path, obj = dup
    helpers = [v for n, v, _ in readelf_functions(path) if n == "helper"]
    assert len(helpers) == 2
    with pytest.raises(AmbiguousSymbol) as error:
        symbols.resolve(obj, "helper")
    message = str(error.value)
    assert message.startswith("libdup.so: symbol 'helper' is ambiguous")
    for sympos, value in enumerate(helpers, 1):
        assert f"sympos {sympos} at {obj.base + value:#x}" in message


def test_sympos_counts_in_symbol_table_order(dup):
    path, obj = dup
    helpers = [(v, s) for n, v, s in readelf_functions(path) if n == "helper"]
    for sympos, (value, size) in enumerate(helpers, 1):
        symbol = symbols.resolve(obj, "helper", sympos)
        assert (symbol.name, symbol.sympos) == ("helper", sympos)
        assert (symbol.address, symbol.offset, symbol.size) == (obj.base + value, value, size)
    # The first unit on the command line comes first: its helper returns x + 1.
    assert symbols.resolve(obj, "dup_a").sympos == 1


def test_sympos_out_of_range_is_not_found(dup):
    _, obj = dup
    with pytest.raises(SymbolNotFound, match=r"libdup.so: symbol 'helper' has no sympos 3: sympos 1 at"):
        symbols.resolve(obj, "helper", 3)


@pytest.fixture(scope="module")
def clones(build):
    path = cc(build / "libclones.so", "clones.c")
    return path, load(path)


@pytest.mark.parametrize("clone", ["weigh.isra.0", "scale.constprop.0",
                                   "cache_fill.part.0", "checked.cold"])
def test_compiler_clones_are_listed_under_their_own_names(clones, clone):
    path, obj = clones
    names = {n for n, _, _ in readelf_functions(path)}
    if clone not in names:
        pytest.skip(f"this compiler made no {clone}")
    symbol = symbols.resolve(obj, clone)
    assert symbol.address == obj.base + readelf_value(path, clone)
    assert clone in {s.name for s in symbols.functions(obj)}


@pytest.mark.parametrize("name, clone", [("weigh", "weigh.isra.0"),
                                         ("scale", "scale.constprop.0"),
                                         ("cache_fill", "cache_fill.part.0")])
def test_missing_function_mentions_its_clones(clones, name, clone):
    path, obj = clones
    if clone not in {n for n, _, _ in readelf_functions(path)}:
        pytest.skip(f"this compiler made no {clone}")
    with pytest.raises(SymbolNotFound) as error:
        symbols.resolve(obj, name)
    assert str(error.value).startswith(
        f"libclones.so: symbol '{name}' not found; close names: {clone} (a compiler clone)")


def test_not_found_suggests_close_names(clones):
    _, obj = clones
    with pytest.raises(SymbolNotFound) as error:
        symbols.resolve(obj, "clones_scal")
    assert str(error.value) == "libclones.so: symbol 'clones_scal' not found; close names: clones_scale"
    with pytest.raises(SymbolNotFound, match=r"^libclones.so: symbol 'zzz_nothing_like_it' not found$"):
        symbols.resolve(obj, "zzz_nothing_like_it")


def test_functions_lists_every_function_by_address(dup):
    path, obj = dup
    listing = symbols.functions(obj)
    assert [s.address for s in listing] == sorted(s.address for s in listing)
    expected = {(n, obj.base + v) for n, v, _ in readelf_functions(path)}
    assert {(s.name, s.address) for s in listing} == expected
    assert sorted(s.sympos for s in listing if s.name == "helper") == [1, 2]


@pytest.mark.parametrize("name", ["libc.so.6", "libz.so.1", "libdup"])
def test_the_function_before_is_one_answer_three_ways(name, dup):
    # symbols.function_before and the hot-patch point search both answer
    # through the C core, from an index of the starts alone
    # (FunctionBefore): as the FuncSym index answers, around every start
    # and between them, aliases included.
    from hotpatch._native import lib
    obj = dup[1] if name == "libdup" else symbols.find_object(name)
    table = elf.table_of(obj, "a test")
    native = symbols.function_before_of(obj).native
    starts = sorted({s.address - obj.base for s in symbols.functions(obj)})
    offsets = {max(0, start + d) for start in starts for d in (-17, -1, 0, 1, 2, 40)}
    offsets |= set(range(0, starts[-1] + 64, max(1, starts[-1] // 5000)))
    for offset in sorted(offsets):
        held = table.function_before(offset)
        want = obj.base + held.value if held is not None else None
        assert symbols.function_before(obj, obj.base + offset) == want, hex(offset)
        assert (lib.hp_function_before(native, obj.base + offset) or None) == want, hex(offset)


def test_an_unreadable_table_gives_the_c_core_no_index(build):
    # FunctionBefore's index for the C core, where the object's file is gone:
    # none (no hot-patch point where only a sweep would show one), not an
    # error for every entry asked about, most of which need no sweep.
    import dataclasses
    from hotpatch._native import ffi
    path = cc(build / "libgone.so", "dup_a.c")
    gone = dataclasses.replace(load(path), name=str(build / "libnowhere.so"))
    assert symbols.function_before_of(gone).native == ffi.NULL
    with pytest.raises(HotpatchError, match="libnowhere.so"):
        symbols.function_before_of(gone)(gone.base + 16)


def test_second_lookup_reads_no_file(build, monkeypatch):
    path = cc(build / "libcached.so", "dup_a.c")
    obj = load(path)
    parsed = []
    parse = elf.parse_file
    monkeypatch.setattr(elf, "parse_file", lambda p: parsed.append(p) or parse(p))
    first = symbols.resolve(obj, "dup_a")
    assert symbols.resolve(obj, "dup_a") == first
    assert symbols.resolve(obj, "helper") != first
    assert parsed == [os.path.realpath(path)]


# --------------------------------------------------------------------------
# IFUNC
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ifunc(build):
    path = cc(build / "libifunc.so", "ifunc.c")
    return path, load(path)


def test_exported_ifunc_resolves_to_the_bound_implementation(ifunc):
    path, obj = ifunc
    symbol = symbols.resolve(obj, "pick")
    fast = symbols.resolve(obj, "pick_fast")
    assert (symbol.address, symbol.size) == (fast.address, fast.size)
    assert symbol.address == ctypes.cast(ctypes.CDLL(path).pick, ctypes.c_void_p).value
    assert symbol.ifunc_resolver == obj.base + readelf_value(path, "resolve_pick")
    assert (symbol.name, symbol.sympos) == ("pick", 1)


def test_static_ifunc_resolves_through_its_irelative_slot(ifunc):
    path, obj = ifunc
    assert ctypes.CDLL(path).call_local(1) == 42
    symbol = symbols.resolve(obj, "local_pick")
    assert symbol.address == symbols.resolve(obj, "local_impl").address
    assert symbol.ifunc_resolver == obj.base + readelf_value(path, "resolve_local")


def test_ifunc_whose_implementation_is_unknown_is_refused(ifunc):
    _, obj = ifunc
    with pytest.raises(UnsafeToPatch) as error:
        symbols.resolve(obj, "orphan")
    message = str(error.value)
    assert message.startswith("libifunc.so: symbol 'orphan' is an IFUNC (STT_GNU_IFUNC)")
    assert "cannot be determined" in message
    listing = {s.name: s for s in symbols.functions(obj)}
    assert "orphan" not in listing
    assert listing["pick"].address == listing["pick_fast"].address


def test_libc_memcpy_ifunc_and_symbol_versions(no_debug_files):
    libc = symbols.find_object("libc.so.6")
    bound = ctypes.cast(ctypes.CDLL("libc.so.6").memcpy, ctypes.c_void_p).value
    with pytest.raises(AmbiguousSymbol) as error:  # .dynsym: memcpy@GLIBC_2.2.5 and @@GLIBC_2.14
        symbols.resolve(libc, "memcpy")
    assert "(memcpy@@GLIBC_2.14)" in str(error.value)
    symbol = symbols.resolve(libc, "memcpy@@GLIBC_2.14")
    assert symbol.address == bound and symbol.ifunc_resolver is not None
    assert symbol.version == "@@GLIBC_2.14"


# --------------------------------------------------------------------------
# Stripped objects and separate debug files
# --------------------------------------------------------------------------

def test_stripped_library_falls_back_to_dynsym(build, no_debug_files):
    lib = cc(build / "libdynsym.so", "debugme.c", flags=["-DVARIANT=3"])
    debug_value = readelf_value(lib, "secret")
    run("strip", "--strip-all", lib)
    obj = load(lib)
    assert symbols.resolve(obj, "debugme_call").address == \
        obj.base + readelf_value(lib, "debugme_call", ".dynsym")
    with pytest.raises(SymbolNotFound) as error:
        symbols.resolve(obj, "secret")
    assert str(error.value).startswith(
        f"libdynsym.so: symbol 'secret' not found; {obj.path} has no .symtab and no "
        f"separate debug file was found")
    # old_offset still reaches it, with no name to give it.
    place = symbols.resolve_offset(obj, debug_value)
    assert (place.name, place.address) == (f"<offset {debug_value:#x}>", obj.base + debug_value)


def test_debug_file_found_by_build_id(build, tmp_path):
    lib = cc(build / "libbyid.so", "debugme.c", flags=["-g", "-DVARIANT=4"])
    build_id = readelf_build_id(lib).hex()
    debug = tmp_path / ".build-id" / build_id[:2] / (build_id[2:] + ".debug")
    debug.parent.mkdir(parents=True)
    strip_with_debug_file(lib, debug)
    obj = load(lib)
    symbols.set_debug_dirs([str(tmp_path / "elsewhere")])
    with pytest.raises(SymbolNotFound):
        symbols.resolve(obj, "secret")
    symbols.set_debug_dirs([str(tmp_path / "elsewhere"), str(tmp_path)])
    secret = symbols.resolve(obj, "secret")
    assert secret.address == obj.base + readelf_value(str(debug), "secret")
    assert ctypes.CDLL(lib).debugme_call(2) == 2 * 4 + 11 - 1


@pytest.mark.parametrize("where", ["beside", ".debug", "debug dir"])
def test_debug_file_found_by_gnu_debuglink(build, tmp_path, where):
    folder = build / f"debuglink-{where.replace(' ', '-')}"
    folder.mkdir()
    lib = cc(folder / "liblinked.so", "debugme.c", flags=["-g", f"-DVARIANT={10 + len(where)}"])
    strip_with_debug_file(lib, folder / "liblinked.debug")
    run("objcopy", "--add-gnu-debuglink=liblinked.debug", lib, cwd=folder)
    target = {"beside": folder,
              ".debug": folder / ".debug",
              "debug dir": tmp_path / str(folder).lstrip("/")}[where]
    target.mkdir(parents=True, exist_ok=True)
    if target != folder:
        shutil.move(folder / "liblinked.debug", target / "liblinked.debug")
    symbols.set_debug_dirs([str(tmp_path)])
    obj = load(lib)
    secret = symbols.resolve(obj, "secret")
    assert secret.address == obj.base + readelf_value(str(target / "liblinked.debug"), "secret")


def test_debuglink_without_build_id_is_checked_by_crc(build, no_debug_files):
    folder = build / "crc"
    folder.mkdir()
    libs = []
    for name, variant in (("libcrc.so", 20), ("libcrcbad.so", 21)):
        lib = cc(folder / name, "debugme.c", flags=["-g", f"-DVARIANT={variant}", "-Wl,--build-id=none"])
        debug = folder / name.replace(".so", ".debug")
        strip_with_debug_file(lib, debug)
        run("objcopy", f"--add-gnu-debuglink={debug.name}", lib, cwd=folder)
        libs.append((lib, debug))
    (good, good_debug), (bad, bad_debug) = libs
    with open(bad_debug, "ab") as f:  # no longer the file the debuglink's CRC names
        f.write(b"\0")
    obj = load(good)
    assert obj.build_id is None
    assert symbols.resolve(obj, "secret").address == \
        obj.base + readelf_value(str(good_debug), "secret")
    with pytest.raises(SymbolNotFound, match="no separate debug file was found"):
        symbols.resolve(load(bad), "secret")


def test_debug_file_of_another_build_is_not_used(build, no_debug_files):
    folder = build / "otherbuild"
    folder.mkdir()
    other = cc(folder / "libother.so", "debugme.c", flags=["-g", "-DVARIANT=30"])
    run("objcopy", "--only-keep-debug", other, folder / "libmine.debug")
    lib = cc(folder / "libmine.so", "debugme.c", flags=["-g", "-DVARIANT=31"])
    run("strip", "--strip-all", lib)
    run("objcopy", "--add-gnu-debuglink=libmine.debug", lib, cwd=folder)
    with pytest.raises(SymbolNotFound, match="no separate debug file was found"):
        symbols.resolve(load(lib), "secret")


def test_distribution_debug_file_gives_static_functions_of_libc():
    libc = symbols.find_object("libc.so.6")
    build_id = libc.build_id.hex()
    debug = f"/usr/lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}.debug"
    if not os.path.exists(debug):
        pytest.skip("libc's debug file is not installed")
    symbols.set_debug_dirs(["/usr/lib/debug"])
    int_malloc = symbols.resolve(libc, "_int_malloc")
    assert int_malloc.address == libc.base + readelf_value(debug, "_int_malloc")
    memcpy = symbols.resolve(libc, "memcpy")  # one IFUNC in .symtab
    assert memcpy.address == ctypes.cast(ctypes.CDLL("libc.so.6").memcpy, ctypes.c_void_p).value
    assert memcpy.size


# --------------------------------------------------------------------------
# The file on disk is not the mapped image
# --------------------------------------------------------------------------

@pytest.mark.parametrize("build_id", ["sha1", "none"])
def test_library_replaced_on_disk_is_refused(build, build_id):
    folder = build / f"replaced-{build_id}"
    folder.mkdir()
    lib = cc(folder / "libreplaced.so", "debugme.c", flags=["-DVARIANT=40", f"-Wl,--build-id={build_id}"])
    obj = load(lib)
    before = symbols.resolve(obj, "secret")
    # Replace it as a package manager does: a new file renamed over the old.
    cc(folder / "libreplaced.so.new", "debugme.c", flags=["-DVARIANT=41", f"-Wl,--build-id={build_id}"])
    os.replace(folder / "libreplaced.so.new", lib)
    # Symbols already read from the mapped image stay right...
    assert symbols.resolve(obj, "secret") == before
    assert symbols.find_object(lib) == obj
    # ...but the new file is never read for it.
    symbols.cache_clear()
    with pytest.raises(UnsafeToPatch) as error:
        symbols.resolve(obj, "secret")
    message = str(error.value)
    assert message.startswith(f"libreplaced.so: cannot resolve symbol 'secret': the file on disk {obj.path} "
                              f"is not the image mapped in this process")
    assert "refusing to resolve against the wrong file" in message
    if build_id == "sha1":
        assert f"mapped {obj.build_id.hex()}" in message
    with pytest.raises(UnsafeToPatch, match="not the image mapped"):
        symbols.resolve_offset(obj, before.offset)


# --------------------------------------------------------------------------
# old_offset
# --------------------------------------------------------------------------

def test_offset_at_inside_and_outside_functions(dup):
    path, obj = dup
    value, size = next((v, s) for n, v, s in readelf_functions(path) if n == "dup_a")
    at = symbols.resolve_offset(obj, value)
    assert (at.name, at.sympos, at.address, at.size) == ("dup_a", 1, obj.base + value, size)
    inside = symbols.resolve_offset(obj, value + 2)
    assert (inside.name, inside.sympos, inside.size) == ("dup_a+0x2", 0, size - 2)


def test_offset_outside_code_is_refused(dup):
    _, obj = dup
    for offset in (0, obj.exec_ranges[-1][1] - obj.base + 0x100000):
        with pytest.raises(UnsafeToPatch) as error:
            symbols.resolve_offset(obj, offset)
        assert str(error.value).startswith(f"libdup.so: offset {offset:#x} at {obj.base + offset:#x} is not code")


# --------------------------------------------------------------------------
# ftrace-style entry sites
# --------------------------------------------------------------------------

@pytest.mark.parametrize("flags, pic", [
    (["-pg", "-mfentry", "-mrecord-mcount"], True),      # call *__fentry__@GOTPCREL(%rip)
    (["-pg", "-mfentry", "-mrecord-mcount"], False),     # call __fentry__@PLT
    (["-fpatchable-function-entry=5"], True),            # a 5-byte NOP
], ids=["got", "plt", "patchable"])
def test_fentry_sites_and_targets(build, flags, pic):
    name = f"libfentry-{'-'.join(f.strip('-=') for f in flags)}-{pic}.so"
    lib = cc(build / name, "fentry.c", flags=flags, pic=pic)
    obj = load(lib)
    entries = {symbols.resolve(obj, f).address for f in ("traced_add", "traced_twice")}
    assert symbols.fentry_sites(obj) == frozenset(entries)
    targets = symbols.fentry_targets(obj)
    fentry = symbols.resolve(obj, "__fentry__").address
    assert fentry in targets
    for entry in entries:
        code = ctypes.string_at(entry, 6)
        if code[:2] == b"\xff\x15":    # call *disp32(%rip): the GOT slot
            assert entry + 6 + int.from_bytes(code[2:6], "little", signed=True) in targets
        elif code[:1] == b"\xe8":      # call rel32: the PLT entry
            assert entry + 5 + int.from_bytes(code[1:5], "little", signed=True) in targets
        else:
            assert code[:5] == b"\x90" * 5 or code[:5] == b"\x0f\x1f\x44\x00\x00"


def test_no_entry_sites_without_ftrace_build(dup):
    _, obj = dup
    assert symbols.fentry_sites(obj) == frozenset()
    assert symbols.fentry_targets(obj) == frozenset()


# --------------------------------------------------------------------------
# Objects nobody here wrote
# --------------------------------------------------------------------------

def test_libz_is_stripped_and_resolves_from_dynsym(no_debug_files):
    libz = symbols.find_object("libz.so.1")
    assert libz is not None and libz.soname == "libz.so.1"
    deflate = symbols.resolve(libz, "deflate")
    assert deflate.address == ctypes.cast(ctypes.CDLL("libz.so.1").deflate, ctypes.c_void_p).value
    assert deflate.size
    with pytest.raises(SymbolNotFound, match=r"^libz.so.1: symbol 'deflate_stored' not found.*no .symtab"):
        symbols.resolve(libz, "deflate_stored")
    exported = {n for n, _, _ in readelf_functions(libz.path, ".dynsym")}
    assert {s.name for s in symbols.functions(libz)} == exported


def test_extension_module_static_function():
    name = os.path.basename(_json.__file__)
    obj = symbols.find_object(name)
    assert obj.path == os.path.realpath(_json.__file__)
    symbol = symbols.resolve(obj, "scanstring_unicode")
    assert symbol.address == obj.base + readelf_value(obj.path, "scanstring_unicode")
    assert symbol.size


def test_libpython_exported_and_static_functions():
    libpython = next((o for o in symbols.loaded_objects()
                      if o.basename.startswith("libpython")), None)
    if libpython is None:
        pytest.skip("this interpreter has no libpython")
    exported = symbols.resolve(libpython, "PyLong_FromLong")
    assert exported.address == ctypes.cast(ctypes.pythonapi.PyLong_FromLong, ctypes.c_void_p).value
    static = symbols.resolve(libpython, "long_add")
    assert static.address == libpython.base + readelf_value(libpython.path, "long_add")


def test_debug_dirs_from_environment():
    code = "from hotpatch import symbols; print(':'.join(symbols.debug_dirs()))"
    env = dict(os.environ, HOTPATCH_DEBUG_DIRS="/a:/b/c")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "/a:/b/c"


def test_loaded_objects_are_listed_again_after_a_load(tmp_path):
    # The list is kept until the dynamic linker's load count changes.
    path = cc(tmp_path / "libcachecheck.so", "dup_a.c")
    assert symbols.find_object("libcachecheck.so") is None
    first = symbols.loaded_objects()
    assert symbols.loaded_objects() == first
    ctypes.CDLL(path)
    assert symbols.find_object("libcachecheck.so") is not None
