"""``python -m hotpatch demo``: live-patch a function of a freshly built library.

Compiles a small C library with the system ``cc``, loads it with ctypes,
registers a patch that redirects its ``price()`` to ``price_fixed()`` while a
thread keeps calling it, shows the entry's instructions and the results
before and after, the measured cost per call, and disables the patch.
"""
import ctypes
import os
import tempfile
import threading

from . import Func, Object, Patch, register, sites, tree, unregister
from .module import build
from .x86_64.decode import decode

SOURCE = r"""
#include <time.h>

/* The shipped function: no volume discount (the bug). */
long price(long quantity) { return quantity * 300; }

/* The fix: 10% off from ten items on. */
long price_fixed(long quantity)
{
    long total = quantity * 300;
    return quantity >= 10 ? total - total / 10 : total;
}

typedef long (*price_fn)(long);

/* Nanoseconds per call of f over n calls, called through a pointer the
 * compiler cannot see through. */
double ns_per_call(price_fn f, long n)
{
    price_fn volatile g = f;
    struct timespec a, b;
    long sum = 0;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        sum += g(i & 15);
    clock_gettime(CLOCK_MONOTONIC, &b);
    __asm__ volatile("" :: "r"(sum));
    return ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n;
}
"""


def build_library(directory):
    """Compile the demo library into ``directory``; returns its path."""
    source = os.path.join(directory, "shop.c")
    library = os.path.join(directory, "libshop.so")
    with open(source, "w") as f:
        f.write(SOURCE)
    return build(source, library)


def show_entry(label, address):
    code = sites.read_memory(address, 16)
    first = [f"{i.mnemonic} {i.op_str}".strip() for i in decode(code, address)[:3]]
    print(f"  {label:<28} {code[:8].hex(' ')}   {'; '.join(first)}")


def overhead(lib, price, fixed, repeats=9, calls=2_000_000):
    """Median ns per call of the patched price() and of price_fixed() called
    directly, measured alternately so that both see the same machine."""
    patched, direct = [], []
    for _ in range(repeats):
        patched.append(lib.ns_per_call(price, calls))
        direct.append(lib.ns_per_call(fixed, calls))
    return sorted(patched)[repeats // 2], sorted(direct)[repeats // 2]


def main():
    with tempfile.TemporaryDirectory(prefix="hotpatch-demo-") as tmp:
        lib = ctypes.CDLL(build_library(tmp))
        lib.price.restype = lib.price_fixed.restype = ctypes.c_long
        lib.price.argtypes = lib.price_fixed.argtypes = [ctypes.c_long]
        lib.ns_per_call.restype = ctypes.c_double
        lib.ns_per_call.argtypes = [ctypes.c_void_p, ctypes.c_long]
        price = ctypes.cast(lib.price, ctypes.c_void_p).value
        fixed = ctypes.cast(lib.price_fixed, ctypes.c_void_p).value

        # A worker keeps calling price() while it is patched under it.
        stop = threading.Event()
        seen = set()

        def worker():
            while not stop.is_set():
                seen.add(lib.price(20))

        thread = threading.Thread(target=worker)
        thread.start()

        print(f"libshop.so loaded; price(20) = {lib.price(20)}  (expected 5400 with the discount)")
        show_entry("price() entry before:", price)
        patch = Patch("volume-discount", [Object("libshop.so", [Func("price", fixed)])])
        register(patch)
        func = patch.objects[0].funcs[0]
        node = tree()["livepatch"]["volume-discount"]
        print(f"\nregistered patch 'volume-discount': enabled={node['enabled']}, "
              f"libshop.so patched={node['libshop.so']['patched']}")
        show_entry("price() entry after:", price)
        print(f"  price(20) = {lib.price(20)}; the old code still runs at {func.original:#x}")
        patched, direct = overhead(lib, price, fixed)
        print(f"\ncost per call: patched price() {patched:.2f} ns, price_fixed() called directly "
              f"{direct:.2f} ns: {patched - direct:+.2f} ns")

        patch.disable()
        unregister(patch)
        print("\ndisabled")
        show_entry("price() entry restored:", price)
        print(f"  price(20) = {lib.price(20)}")
        stop.set()
        thread.join()
        print(f"\nthe worker thread saw only {sorted(seen)} while price() was patched under it")
    return 0
