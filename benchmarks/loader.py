"""dlopen+dlclose of a small library, without and with the loader hook
(``python -m benchmarks.loader``): what the r_brk hook costs every load."""
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time

CODE = """
import ctypes, sys, time
libdl = ctypes.CDLL(None)
libdl.dlopen.restype = ctypes.c_void_p
libdl.dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
libdl.dlclose.argtypes = [ctypes.c_void_p]
path, hook = sys.argv[1].encode(), sys.argv[2]
if hook != "none":
    import hotpatch
    new = ctypes.cast(libdl.labs, ctypes.c_void_p).value    # any code: the patch stays disabled
    # a patch waiting for another object: every load goes through the hook
    hotpatch.register(hotpatch.Patch("w", [hotpatch.Object(
        "libnot-loaded.so" if hook == "waiting" else "libbench.so",
        [hotpatch.Func("bench", new)])]), enable=False)
for _ in range(200):
    libdl.dlclose(libdl.dlopen(path, 2))
t = time.perf_counter()
for _ in range(2000):
    libdl.dlclose(libdl.dlopen(path, 2))
print((time.perf_counter() - t) / 2000 * 1e6)
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = os.path.join(tmp, "b.c"), os.path.join(tmp, "libbench.so")
        with open(src, "w") as f:
            f.write("long bench(long x) { return x + 1; }\n")
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", src, "-o", lib], check=True)
        print("| series | median us per dlopen+dlclose | runs |\n|---|---|---|")
        base = None
        for hook in ("none", "waiting", "named"):
            runs = [float(subprocess.run([sys.executable, "-c", CODE, lib, hook], check=True,
                                         capture_output=True, text=True).stdout)
                    for _ in range(7)]
            median = statistics.median(runs)
            base = base or median
            print(f"| {hook} | {median:.1f} ({(median / base - 1) * 100:+.1f} %) | "
                  f"{', '.join(f'{r:.1f}' for r in runs)} |")


if __name__ == "__main__":
    main()
