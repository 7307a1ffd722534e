"""Tables, plots and the README, from ``results.json`` alone.

``write()`` regenerates ``results/results.md``, ``results/*.png`` and
``benchmarks/README.md``; ``python -m benchmarks --report-only`` calls it
without measuring.  Every "behind" in a table compares hotpatch with the
best peer on the same figure: behind when hotpatch's median lies beyond the
peer's upper quartile (or its share is lower).
"""
from __future__ import annotations

import collections
import json
import os
import statistics

from .apply import MODEL_STEPS, ONE_CALL_KINDS, growth
from .overhead import BY_KEY, METHODS, VARIANTS
from .service import SINGLE_STEPS as SERVICE_SINGLE_STEPS
from .service import STEP_CAUSES as SERVICE_STEP_CAUSES, STEP_TITLES as SERVICE_STEP_TITLES
from .stop import pause_key

HOTPATCH_KEYS = ("direct", "slot", "call", "stack1", "stack4", "stack16", "retargets", "python",
                 "original", "original_nop", "plt_slot", "plt_entry")
PEER_KEYS = ("got", "frida_fast", "frida_replace", "frida_plt")


# ---------------------------------------------------------------------------
# Formatting


def num(x: float | None, unit: str = "") -> str:
    """A number with as many digits as its size deserves."""
    if x is None:
        return "—"
    a = abs(x)
    text = f"{x:,.0f}" if a >= 100 else f"{x:.1f}" if a >= 10 else f"{x:.2f}" if a >= 0.995 else f"{x:.3f}"
    return text + unit


def signed(x: float, unit: str = "") -> str:
    return ("+" if x >= 0 else "−") + num(abs(x), unit)


def spread(s: dict | None, unit: str = "", sign: bool = False) -> str:
    """"median [q1 – q3]" of a summary."""
    if not s:
        return "—"
    f = signed if sign else num
    return f"{f(s['median'], unit)} [{f(s['q1'])} – {f(s['q3'])}]"


def table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# 1. Overhead


def _overhead_form(key: str, timing: dict) -> str:
    setup = timing.get("setup", {})
    forms = setup.get("forms", {})
    if key in forms:
        return forms[key] + (" (cffi callback)" if key == "python" else "")
    return {"limit": "call new_fn itself", "unpatched": "no redirection",
            "original": f"{setup.get('original_kind', '')} entry: relocated prologue + jmp back",
            "original_nop": f"{setup.get('original_nop_kind', '')} entry: the body after the NOP",
            "got": "PLT → rewritten GOT slot", "frida_fast": "Frida 17", "frida_replace": "Frida 17",
            "plt_limit": "PLT → GOT slot → peer_new (no redirection)",
            "plt_slot": "PLT → GOT slot pointed at new_fn by hotpatch",
            "plt_entry": "PLT → GOT slot → entry `jmp` → new_fn",
            "frida_plt": "PLT → GOT slot → Frida 17 replaceFast"}.get(key, "")


def _peer_verdict(key: str, method: str, deltas: dict) -> str:
    """Whether hotpatch's variant is behind the best peer on this figure."""
    mine = deltas.get(f"{key}/{method}")
    # Only peers measured against the same reference: a PLT row's Δ excludes the PLT.
    peers = [(p, deltas[f"{p}/{method}"]) for p in PEER_KEYS
             if f"{p}/{method}" in deltas and BY_KEY[p].reference == BY_KEY[key].reference]
    if mine is None or not peers:
        return ""
    name, best = min(peers, key=lambda p: p[1]["median"])
    if mine["median"] > best["q3"]:
        return f"behind {BY_KEY[name].label} by {num(mine['median'] - best['median'], ' ns')}"
    return f"level with or ahead of {BY_KEY[name].label}"


def _instructions(key: str, method: str, counts: dict) -> str:
    per_call = counts.get("per_call", {})
    label = f"{key}/{method}"
    if label not in per_call:
        return "—"
    ref = per_call.get(f"{BY_KEY[key].reference}/{method}")
    value = per_call[label]
    if ref is None or BY_KEY[key].reference == key:
        return num(value)
    return f"{num(value)} ({signed(value - ref)})"


def overhead_section(r: dict, images: str) -> str:
    if "failed" in r:
        return "## 1. Overhead per call\n\nThe series failed:\n\n```\n" + r["failed"] + "\n```\n"
    timing, counts = r["timing"], r["instructions"]
    ns, deltas = timing["ns_per_call"], timing["delta_ns"]
    rows = []
    for v in VARIANTS:
        if v.peer and timing["frida"].get(v.key) != "ok":
            rows.append([v.label, "not measured: " + timing["frida"].get(v.key, "?")] + [""] * 7)
            continue
        cells = [v.label, _overhead_form(v.key, timing)]
        for method in METHODS:
            label = f"{v.key}/{method}"
            if label not in ns:
                cells += ["—", "—"]
                continue
            cells += [spread(ns[label]), spread(deltas.get(label), sign=True) if v.reference != v.key else "(reference)"]
        cells += [_instructions(v.key, m, counts) for m in METHODS]
        verdicts = [f"{_peer_verdict(v.key, m, deltas)} ({m})" for m in METHODS
                    if v.key in HOTPATCH_KEYS and _peer_verdict(v.key, m, deltas)]
        cells.append("; ".join(verdicts))
        rows.append(cells)
    columns = ["variant", "form", "ns/call, pointer", "Δ ns vs reference, pointer",
               "ns/call, call rel32", "Δ ns vs reference, rel32",
               "instructions/call, pointer (Δ)", "instructions/call, rel32 (Δ)", "vs peers"]
    expensive = {k: n for k, n in timing["calls"].items() if n < r["calls"]}
    setup = timing.get("setup", {})
    notes = [
        f"Median [quartiles] of {r['rounds']} alternating rounds; Δ is taken per round against the "
        "reference in the same round (the direct call to `new_fn`; for the two *original* rows the "
        "unpatched old function, which runs the same body; for the *through a PLT* rows the "
        "unpatched PLT call to `peer_new`, whose body is `new_fn`'s).",
        f"{r['calls']:,} calls per measurement; slower variants run fewer so that a measurement "
        "takes about as long: " + ", ".join(f"{k} {n:,}" for k, n in expensive.items()) + ".",
        "Every measurement's checksum is checked: the redirection really was in effect.",
        "*Stack of N patches*: N livepatches registered on one function, each on top of the "
        "last (`hotpatch.register`); calls go to the top of the stack.",
        f"*After {r['retargets']:,} retargets*: one site moved between two "
        f"replacements, then to `new_fn`. A retarget took {num(setup.get('retarget_us', {}).get('direct'), ' µs')} "
        f"in the direct form (int3 rewrite) and {num(setup.get('retarget_us', {}).get('slot'), ' µs')} "
        "in the slot form (one 8-byte store), Python included.",
        "*Python callable*: a cffi callback `long(long)`; the form column shows which form hotpatch "
        "picked for its address.",
        "*GOT/PLT interposition*: the driver calls `peer_fn` of a second library through its PLT; "
        "the GOT slot is rewritten. A function pointer to `peer_fn` skips the GOT, so the pointer "
        "column does not apply (the redirection does not reach it).",
        "*Through a PLT*: the driver calls functions of that library through its PLT (rel32 only: "
        "a pointer skips the PLT). `peer_plt` and `peer_entry` are patched by hotpatch to `new_fn` "
        "(`hotpatch.register`): the driver's JUMP_SLOT slot of `peer_plt` is pointed at `new_fn` "
        "(hotpatch/plt.py); the one of `peer_entry` is put back at the entry by hand, as a slot "
        "that the dynamic linker binds lazily after the patch is, so its calls take the entry's "
        "`jmp`. Slots as measured: "
        + ("`peer_plt` → `new_fn`, " if setup.get("plt", {}).get("slot_is_new_fn") else
           "`peer_plt` NOT redirected, ")
        + ("`peer_entry` → its entry." if setup.get("plt", {}).get("entry_slot_is_entry") else
           "`peer_entry` NOT at its entry."),
    ]
    if "skipped" in counts:
        notes.append(f"Instruction counts: not measured ({counts['skipped']}).")
    else:
        notes.append(f"Instructions per call: callgrind ({counts['valgrind']}, {counts['options']}), "
                     "loop overhead included (the Δ removes it). Frida cannot run under valgrind; its "
                     "rows have no count. Checksums under valgrind: "
                     + ("all right" if all(counts["checks"].values()) else
                        "WRONG for " + ", ".join(k for k, ok in counts["checks"].items() if not ok)) + ".")
    return ("## 1. Overhead per call\n\n" + table(columns, rows) + "\n\n"
            + "\n".join(f"- {n}" for n in notes) + f"\n\n![overhead]({images}overhead.png)\n")


# ---------------------------------------------------------------------------
# 2. Apply


def _per_function(s: dict | None, count: str) -> str:
    return num(s["median"] / int(count), " µs") if s else "—"


def _apply_row(r: dict, threads: str, count: str) -> list[str]:
    hp = r["hotpatch"].get(threads, {})
    fr = r.get("frida", {}).get(threads, {}) if "skipped" not in r.get("frida", {}) else {}

    def get(d, phase):
        return d.get(phase, {}).get(count)

    apply_s, frida_s = get(hp, "apply"), get(fr, "replace_install")
    ratio = ""
    if apply_s and frida_s:
        x = frida_s["median"] / apply_s["median"]
        ratio = f"{num(x)}x" + (" (behind)" if x < 1 else "")
    return [threads, f"{int(count):,}", spread(apply_s), _per_function(apply_s, count),
            spread(get(hp, "prepare")), spread(get(hp, "write")), spread(get(hp, "revert")),
            spread(get(hp, "reapply")), spread(get(hp, "retarget")),
            spread(frida_s), _per_function(frida_s, count),
            spread(get(fr, "replaceFast_install")), spread(get(fr, "replace_revert")), ratio]


def _growth_rows(r: dict) -> list[list[str]]:
    rows = []
    for threads in map(str, r["threads"]):
        cells = [threads]
        for tool, phase in (("hotpatch", "apply"), ("hotpatch", "prepare"), ("hotpatch", "write"),
                            ("frida", "replace_install"), ("frida", "replaceFast_install")):
            series = r.get(tool, {}).get(threads, {}).get(phase)
            k = growth({c: s["median"] for c, s in series.items()}) if series else None
            cells.append(f"{k:.2f}" if k is not None else "—")
        rows.append(cells)
    return rows


HOTPATCH_UNSTOPPED_PHASES = ("apply", "prepare", "write", "revert", "reapply", "retarget")


def apply_section(r: dict, images: str) -> str:
    if "failed" in r:
        return "## 2. Apply and revert\n\nThe series failed:\n\n```\n" + r["failed"] + "\n```\n"
    rows = [_apply_row(r, str(t), str(c)) for t in r["threads"] for c in r["counts"]]
    columns = ["busy threads", "functions", "hotpatch apply µs", "per function",
               "prepare µs", "write µs", "revert µs", "reapply µs", "retarget µs",
               "Frida replace µs", "per function", "Frida replaceFast µs", "Frida revert µs",
               "Frida ÷ hotpatch"]
    out = ["## 2. Apply and revert latency", "",
           f"Median [quartiles] of {r['repeats']} fresh processes per setting; hotpatch and Frida "
           "alternate. *apply* = *prepare* (analysis of every entry, original stubs; nothing "
           "written) + *write* (one batch: one stop of the world for these prologues). "
           "*reapply*: the same functions again (sites cached); *retarget*: every installed site "
           "to another replacement. Frida's figures are timed inside the process around "
           "`Interceptor.replace`/`replaceFast` + `Interceptor.flush()`. Busy threads call every "
           "function of the library in a loop meanwhile (the machine has "
           "2 cores, so 8 busy threads oversubscribe it).", "",
           table(columns, rows), "",
           "Growth exponent k of time ∝ count^k (fitted on counts ≥ 10; 1 = linear):", "",
           table(["busy threads", "hotpatch apply", "hotpatch prepare", "hotpatch write",
                  "Frida replace", "Frida replaceFast"], _growth_rows(r)), ""]
    first = r.get("hotpatch_first", {})
    if first:
        frida_first = r.get("frida_first", {})
        rows = [[t, spread(first[t].get("apply")), spread(first[t].get("prepare")),
                 spread(first[t].get("write")), spread(first[t].get("revert")),
                 spread(frida_first.get(t, {}).get("replace_install")),
                 spread(frida_first.get(t, {}).get("replaceFast_install"))] for t in first]
        out += ["The first patch of a process (one function, one-time costs included; not in the "
                "table above):", "",
                table(["busy threads", "hotpatch apply µs", "prepare µs", "write µs", "revert µs",
                       "Frida replace µs", "Frida replaceFast µs"], rows), ""]
    unstopped = r.get("hotpatch_unstopped", {})
    if unstopped:
        rows = [[t] + [spread(unstopped[t].get(phase)) for phase in HOTPATCH_UNSTOPPED_PHASES]
                + [spread(_frida_one_call(r, t, "unstopped"))] for t in unstopped]
        out += ["One function whose entry needs no stop (`u_*`: its first instruction, a 7-byte "
                "load, covers the write; one atomic store, `native/unstopped.c`), after the counts "
                "above in the same processes: the median of 8 such functions per process, then "
                "median [quartiles] over the processes. Every phase checked to have taken no stop. "
                "Beside it, Frida's replace of such functions one at a time (see the one-call "
                "tables below).", "",
                table(["busy threads", "apply µs", "prepare µs", "write µs", "revert µs",
                       "reapply µs", "retarget µs", "Frida replace µs (u_*, one at a time)"],
                      rows), ""]
    one_call = r.get("hotpatch_one_call", {})
    if one_call:
        rows = [[t] + [spread(one_call[t].get(kind)) for kind in ONE_CALL_KINDS]
                + [spread(one_call[t].get(beside)) for beside in ("lookup", "control",
                                                                   "kernel_floor")]
                for t in one_call]
        theirs = [[t] + [spread(_frida_one_call(r, t, kind)) for kind in ONE_CALL_KINDS]
                  + [_times(_frida_one_call(r, t, kind), one_call[t].get(kind))
                     for kind in ONE_CALL_KINDS] for t in one_call]
        out += ["One function's first redirect in one call, `sites.redirect(entry, target)` "
                "(`native/first.c`: plan, original stub, hot-patch point and entry write from "
                "one read of the entry's bytes), as Frida's `replace` is one call: the call "
                "alone timed, given the object's segments and the symbol table's function "
                "before, as Frida's timed `replace` is given resolved addresses (its module "
                "looked up before its clock starts); 16 functions of each kind never patched "
                "before, after the tables above in the same processes, the first 8 warming the "
                "path up, the median of the next 8 per process, then median [quartiles] over the "
                "processes. *Object lookup*: the lookup of those two before each call "
                "(`find_object` by name, `function_before_of`), cached after the first, "
                "timed apart: add it to a column for what a user's redirect of a function "
                "by its object's name costs. *f_\**: several instructions at the entry, through its "
                "hot-patch point where other threads run (the `jmp` at the entry in a process "
                "of one thread); *u_\**: one atomic store. Both checked to have taken no "
                "stop. Each kind also with an idle thread in the process (blocking every "
                "signal, asleep), as real services have: then no write is alone, and f_* go "
                "through their hot-patch points even with no busy thread. *Control*: a fixed piece of work (12 system calls and a Python loop) "
                "timed after each redirect in the same process: this machine has quiet and "
                "noisy moments, and everything, the control included, takes longer in the "
                "noisy ones. *Kernel floor*: the system calls that make a write through a "
                "hot-patch point safe for running threads (a core sync after the point's "
                "`jmp`, the `mprotect` window of the entry's atomic store, a core sync after "
                "it), made on a page nothing runs and timed after each redirect: with busy "
                "threads in the process each one interrupts their CPUs and waits for them, "
                "and no redirect that syncs the cores goes under it.", "",
                table(["busy threads"] + [f"{_ONE_CALL_SHORT[kind]} µs" for kind in ONE_CALL_KINDS]
                      + ["object lookup µs", "control µs", "kernel floor µs"], rows), "",
                "Frida's `replace` of the same functions one at a time, in a process of its own "
                "with the same library, busy threads and idle thread, timed the same way: 16 "
                "functions of each kind never patched before, each installed (with its "
                "`Interceptor.flush()`, timed inside the process) and reverted, the first 8 "
                "warming the path up, the median of the next 8 per process, then median "
                "[quartiles] over the processes. Measured before Frida's counts, so that a "
                "crash there does not lose them. Its first replace in a process takes about "
                "twice its later ones, as hotpatch's first redirect does: the 1-function "
                "column of the counts above is such a single call, after 10,000 functions, "
                "for both; these are its warm figure.", "",
                table(["busy threads"]
                      + [f"Frida replace µs, {_ONE_CALL_SHORT[kind]}" for kind in ONE_CALL_KINDS]
                      + [f"Frida ÷ hotpatch, {_ONE_CALL_SHORT[kind]}" for kind in ONE_CALL_KINDS],
                      theirs), ""]
    model = r.get("hotpatch_model", {})
    if model:
        rows = []
        for t in model:
            theirs = {step: _frida_one_call(r, t, kind)
                      for step, kind in (("register", "hop"), ("register_idle", "hop_idle"))}
            rows.append([t] + [spread(model[t].get(step)) for step in MODEL_STEPS]
                        + [spread(theirs["register"]), spread(theirs["register_idle"])]
                        + [_times(theirs[step], model[t].get(step))
                           for step in ("register", "register_idle")])
        out += ["The livepatch model's way, what a user calls: `hotpatch.register(patch)` of a "
                "patch of one function never patched before (its object's symbols read by the "
                "patches before; enabled, PLT slots pointed, callbacks and notifications "
                "run), checked to take effect, and its `disable()`; 16 functions in each "
                "setting, after the one-call redirects above in the same processes, the "
                "first 8 warming the path up, the median of the next 8 per process, then "
                "median [quartiles] over the processes; then the same with an idle thread "
                "in the process. Shown beside the targets, which are the apply's: the "
                "model's bookkeeping around the write (resolution, the transition, PLT "
                "slots, callbacks, notifications) is its own.", "",
                table(["busy threads", "register µs", "disable µs", "register µs, idle thread",
                       "disable µs, idle thread", "Frida replace µs (f_*, one at a time)",
                       "Frida replace µs (f_*, one at a time), idle thread",
                       "Frida ÷ register", "Frida ÷ register, idle thread"], rows), ""]
    for line in r.get("frida_refused", []):
        out.append(f"- Frida refused {line}")
    for threads in r["threads"]:
        crashes = [c["what"] for c in r.get("frida_crashes", []) if c["threads"] == threads]
        if crashes:
            out.append(f"- **Frida crashed the process in {len(crashes)} of {r['repeats']} runs with "
                       f"{threads} busy threads** (it writes code that those threads are running "
                       f"without stopping them): " + "; ".join(sorted(set(crashes)))
                       + ". Its figures for that setting come from what each run measured "
                       "before it died (one function at a time first, then the counts in order).")
    failures = collections.Counter((f["tool"], f["threads"], f["error"]) for f in r.get("failures", []))
    for (tool, threads, error), n in sorted(failures.items()):
        out.append(f"- **{tool} failed in {n} of {r['repeats']} runs with {threads} busy threads**: "
                   f"{error} (its figures for that setting come from the other runs)")
    if "skipped" in r.get("frida", {}):
        out.append(f"- {r['frida']['skipped']}")
    out.append(f"\n![apply]({images}apply.png)\n")
    return "\n".join(out)


# ---------------------------------------------------------------------------
# 2b. Reach


def _share(outcome: dict | None) -> str:
    if not outcome:
        return "—"
    return f"{outcome['ok']:,}/{outcome['total']:,} ({100 * outcome['ok'] / max(outcome['total'], 1):.1f}%)"


def _reasons(outcome: dict | None) -> str:
    if not outcome or not outcome["refused"]:
        return "—"
    return "; ".join(f"{reason}: {n}" for reason, n in outcome["refused"].items())


def reach_section(r: dict, images: str) -> str:
    if "failed" in r:
        return "## 2b. Reach\n\nThe series failed:\n\n```\n" + r["failed"] + "\n```\n"
    rows = []
    for label, lib in r["libraries"].items():
        if "missing" in lib:
            rows.append([label, "not installed: " + lib["missing"]] + [""] * 7)
            continue
        hp = lib["hotpatch"]
        peers = [lib.get("frida_replace"), lib.get("frida_replaceFast")]
        best = max((p["ok"] for p in peers if p), default=None)
        verdict = "behind" if best is not None and hp["ok"] < best else ""
        rows.append([label, f"{lib['functions']:,} ({lib['symbols']}; {lib['ifuncs']} IFUNC)",
                     _share(hp) + (f" **{verdict}**" if verdict else ""),
                     _share({"ok": hp["unstopped"], "total": hp["total"]})
                     if "unstopped" in hp else "—", _share(peers[0]),
                     _share(peers[1]), _reasons(hp), _reasons(peers[0]), _reasons(peers[1])])
    columns = ["library", "functions", "hotpatch", "hotpatch, first patch without a stop",
               "Frida replace", "Frida replaceFast",
               "hotpatch refusals", "Frida replace refusals", "Frida replaceFast refusals"]
    sample = (f"an evenly spread sample of at most {r['limit']} functions per library"
              if r.get("limit") else "every sized function symbol")
    out = ["## 2b. Reach", "",
           f"Share of {sample} (as `hotpatch.symbols` lists them; an IFUNC at its bound "
           "implementation) that each tool accepts, at the same offsets. hotpatch: "
           "`sites.prepare()` succeeds (full "
           "analysis and original stub; nothing written). Frida: `replace`/`replaceFast` succeed "
           "(reverted at once, in a throwaway process). Frida's only refusal message is generic; "
           "the function's size is added to it. *First patch without a stop*: the accepted "
           "functions whose entry write the C core makes as one atomic store, holding no thread "
           "(`native/unstopped.c`: the first instruction covers the write, or is a `ret`/`jmp` "
           "followed by padding), or through a hot-patch point (`native/hop.c`: a `jmp rel8` "
           "over a first instruction of 2 bytes or more to a `jmp rel32` in the dead padding "
           "before the entry); the others take a stop of the other threads. Restoring and "
           "retargeting never take one.", "", table(columns, rows), ""]
    if "skipped" in r.get("frida", {}):
        out.append(f"- {r['frida']['skipped']}")
    for line in r.get("failures", []):
        out.append(f"- FAILED: {line.splitlines()[0]}")
    out.append(f"\n![reach]({images}reach.png)\n")
    return "\n".join(out)


# ---------------------------------------------------------------------------
# 2c. Stops


STOPPERS = {"ptrace": "ptrace helper", "signals": "signal stop"}
_FIGURE = {"gap_us": "longest gap a busy thread saw", "stop_us": "the core's stop time"}


def triple(s: dict | None, sign: bool = False) -> str:
    """"median / p90 / max" of a stats() dict."""
    if not s:
        return "—"
    f = signed if sign else num
    return f"{f(s['median'])} / {f(s['p90'])} / {f(s['max'])}"


def _lateness(m: dict) -> str:
    s = m.get("late_us")
    if not s:
        return "none due"
    return f"{s['n']}: {num(s['median'])} / {num(s['max'])}"


def _ordered(r: dict) -> list[dict]:
    return [l for l in r["loads"] if l["label"] in r["results"]]


def _stop_verdicts(r: dict) -> list[tuple[str, str, str, float, float, bool]]:
    """(load, method, figure, median µs, target µs, met) for each target."""
    out = []
    for load in _ordered(r):
        target = r["targets_us"].get(load["label"])
        if target is None:
            continue
        key = pause_key(load["busy"])
        for method in r["methods"]:
            s = r["results"][load["label"]][method]["one"][key]
            if s:
                out.append((load["label"], method, key, s["median"], target, s["median"] < target))
    return out


def _stop_closing(r: dict) -> list[str]:
    """What the figures say about each missed target, and what would close it."""
    notes = []
    for label, method, key, median, target, met in _stop_verdicts(r):
        if met:
            continue
        m = r["results"][label][method]["one"]
        hold, stop = m["hold_us"]["median"], m["stop_us"]["median"]
        name = f"**{label}, {STOPPERS[method]}: {num(median, ' µs')}, target < {num(target, ' µs')}.**"
        if key == "gap_us":
            control, added = m["control_gap_us"], m["added_gap_us"]
            beyond = control and control["median"] >= target
            notes.append(
                f"{name} With nothing written, the same threads saw {num(control['median'], ' µs')} "
                f"over windows as long (the control); a stop's gap less its own control's is "
                f"{signed(added['median'], ' µs')} (median). "
                + ("The control alone is above the target: 8 threads that never block on 2 cores "
                   "each wait for a CPU for several scheduler slices at a time, stop or no stop, so "
                   "no stopper can bring this figure under 2 ms here; the target can only be met for "
                   "what the stop *adds*, or with no more busy threads than cores. "
                   if beyond else "")
                + f"The core's figures for these stops (stop time {num(stop, ' µs')}, hold "
                f"{num(hold, ' µs')}) are taken by the patching thread, which waits for a CPU too "
                + ("(and the helper, which lets the threads go one PTRACE_DETACH at a time while "
                   "those already let go compete with it for the CPU)"
                   if method == "ptrace" else
                   "(a thread asked to park must first be scheduled to run its handler)")
                + ". What would shorten the stop's own share: letting the patching thread (and "
                "the helper) run ahead of the held threads during a stop, e.g. a raised priority "
                "where the process may have one, and fewer scheduling round trips per stop.")
        else:
            notes.append(
                f"{name} Of that, the threads are all held for {num(hold, ' µs')} (the code checked "
                f"and written, the cores synced, the threads let go); the other "
                f"{num(stop - hold, ' µs')} go to stopping them: "
                + ("a request to the helper process over its socket (a cross-process wakeup), "
                   "then for each thread PTRACE_SEIZE, PTRACE_INTERRUPT, a wait for its stop and "
                   "PTRACE_GETREGS, a second listing of /proc/PID/task, and the stacks read for "
                   "signal frames. The series does not time these steps one by one; the "
                   "per-thread attach is where to look first: every thread is attached and "
                   "detached at each stop. Keeping the tracees attached across the stops of a "
                   "transition (PTRACE_INTERRUPT and PTRACE_CONT only) would take the attach out "
                   "of every stop but the first, at the price of threads traced in between."
                   if method == "ptrace" else
                   "the /proc status file of every thread read (open, read, close) to check its "
                   "signal mask before any signal is sent, one tgkill per thread, each thread "
                   "scheduled to run its handler, and at each wakeup of the patching thread the "
                   "thread list read again and the status file of every thread not yet parked. "
                   "The series does not time these steps one by one; checking the masks once, "
                   "and counting arrivals against the threads signalled instead of listing again, "
                   "would remove most of the system calls.")
                + " The write itself is a small part.")
    return notes


def stop_section(r: dict, images: str) -> str:
    head = "## 2c. Stopping the other threads: ptrace helper and signal stop\n\n"
    if "failed" in r:
        return head + "The series failed:\n\n```\n" + r["failed"] + "\n```\n"
    pause_rows, latency_rows = [], []
    for load in _ordered(r):
        label, busy = load["label"], load["busy"]
        res = r["results"][label]
        for method in r["methods"]:
            m = res[method]
            one, big = m["one"], m["big"]
            key = pause_key(busy)
            refused = f" ({m['refused']} refused)" if m.get("refused") else ""
            pause_rows.append([
                label, STOPPERS[method], f"{one['stops']}{refused}",
                f"**{triple(one[key])}**",
                triple(one["control_gap_us"]) if busy else "—",
                triple(one["added_gap_us"], sign=True) if busy else "—",
                triple(one["stop_us"]), triple(one["hold_us"]),
                _lateness(one), triple(res["sleeper_quiet_us"])])
            lat = m["latency_us"]
            latency_rows.append([
                label, STOPPERS[method], triple(lat["apply1"]), triple(lat["restore1"]),
                triple(lat["apply1000"]), triple(lat["restore1000"]),
                triple(big[key]), triple(big["hold_us"]),
                f"{num(m['first_us']['median'])} ({num(m['first_stop_us']['median'])})"
                if m.get("first_us") else "—"])
    rep = r["repeats"]
    out = [head.rstrip("\n"), "",
           "A code write that is not one atomic store of one instruction (a first patch of an entry "
           "of several instructions) happens in a *stop*; this series sends every batch to one "
           "(`HOTPATCH_STOP=always`), restores included, which need none otherwise. In a stop every "
           "other thread of the process is held while "
           "the bytes are written, by a ptrace helper process (PTRACE_SEIZE + PTRACE_INTERRUPT of "
           "each thread, PTRACE_DETACH after; the default) or by parking each thread in a handler "
           "of SIGRTMAX-2 (`HOTPATCH_STOPPER=signals`, the fallback). `python -m benchmarks.stop` "
           "(`benchmarks/stop.py`, threads in `benchmarks/stop_threads.c`) measures both in the "
           f"same child processes, stop by stop in ABBA order ({r['children']} fresh "
           f"child{'ren' if r['children'] > 1 else ''} per load, each starting with the other "
           "method), on the same sites: one function, and "
           f"{r['big']:,} distinct generated `-O2` functions with generic prologues, prepared "
           "beforehand (the analysis is section 2's subject).", "",
           "- *Busy threads* spin in C reading CLOCK_MONOTONIC; every gap between two readings is "
           "recorded. A stop's **pause** for them is the longest gap of any busy thread that "
           "overlaps the stop (it was held, or descheduled meanwhile). *Control*: right after each "
           "stop the patching thread spins for as long as the stop took, writing nothing, and the "
           "same figure is taken over that window (8 busy threads on 2 cores are descheduled for "
           "long stretches anyway); *Δ* is each stop's gap less its own control's.",
           "- *Idle threads* block, half in `pthread_cond_wait`, half in a `nanosleep` loop. They "
           "cannot report a gap, so a stop's **pause** for them is the core's *stop time* "
           "(`tree()[\"core\"][\"stops\"]`, read around each batch: from asking for the stop to "
           "letting the threads go; no thread is held longer). The *hold* is its part from every "
           "thread held to every thread let go (code checked, written, cores synced, release).",
           "- A *1 ms sleeper* (absolute deadlines, `clock_nanosleep`, timer slack 1 ns; a missed "
           "period is skipped) runs in every load: what an idle thread sees. For each batch, the "
           "most delayed of its wakeups due between the call and the return is taken (*n*: the batches "
           "during which one was due). The batch call includes the work before the stop (see "
           "below), so many of those wakeups fall before the threads are held and are barely "
           "late: the median is low, the max shows what a stop did (a wakeup due inside a stop "
           "is late by the rest of the stop). Its lateness over quiet phases of the same "
           "children (nothing written) is its control.",
           "- Figures are **median / p90 / max** in µs; the pause column is the one the targets "
           "use (busy loads: the gap; the others: the stop time).",
           f"- The machine is shared with other work: 1-minute load average {r['loadavg'][0]} when "
           f"the series started, {r['loadavg'][1]} when it ended. Only medians of interleaved stops "
           "are compared, never single stops.", "",
           f"**Pause of a stop of 1 site** ({rep['one']} applies and {rep['one']} restores per "
           "method and load):", "",
           table(["threads", "stopper", "stops", "pause µs", "control: busy gap, nothing written µs",
                  "Δ gap vs control µs", "core stop time µs", "core hold µs",
                  "1 ms sleeper: wakeups due during a stop, n: median / max lateness µs",
                  "sleeper lateness, nothing written µs"], pause_rows), "",
           f"**Apply latency**: wall time of `sites.redirect_batch` (apply) and "
           f"`sites.restore_batch` (restore), one batch = one stop ({rep['one']} repeats of 1 site, "
           f"{rep['big']} of {r['big']:,} sites per method and load):", "",
           table(["threads", "stopper", "apply 1 site µs", "restore 1 site µs",
                  f"apply {r['big']:,} sites µs", f"restore {r['big']:,} sites µs",
                  f"pause of a {r['big']:,}-site stop µs", f"core hold, {r['big']:,} sites µs",
                  "first stop of the process: wall µs (stop time)"], latency_rows), "",
           "- The first stop of each method in a process is not in the tables above: it pays "
           "one-time costs (ptrace: starting the helper process; signals: installing the park "
           "handler); its median is in the last column."]
    verdicts = _stop_verdicts(r)
    if verdicts:
        out += ["", "Targets on this machine (2 cores):", "",
                table(["load", "stopper", "figure", "median", "target", "verdict"],
                      [[label, STOPPERS[method], _FIGURE[key], num(median, " µs"),
                        f"< {num(target, ' µs')}", "met" if met else "**not met**"]
                       for label, method, key, median, target, met in verdicts]), ""]
    closing = _stop_closing(r)
    if closing:
        out += ["What the figures say about each missed target, and what would close it:", ""]
        out += [f"- {n}" for n in closing]
        out.append("")
    for method in r["methods"]:
        for load in _ordered(r):
            m = r["results"][load["label"]][method]
            if m.get("refused"):
                out.append(f"- **The {STOPPERS[method]} refused {m['refused']} stops with "
                           f"{load['label']} threads** (nothing written; a refused apply is not "
                           "retried, a refused restore is tried again a moment later): "
                           + "; ".join(f"`{msg}`" for msg in m["refused_messages"]))
    if any(r["results"][l["label"]]["signals"].get("refused") for l in _ordered(r)):
        out.append("- Why the signal stop refuses: before signalling anyone it reads every "
                   "thread's blocked signals and refuses a thread that blocks the park signal. A "
                   "thread let go by the previous stop that has not yet finished the park "
                   "handler still has the handler's mask (every signal blocked), so it is "
                   "refused although it would take the signal as soon as it returns (as the "
                   "comment at the top of `stop_signal.c` says). With more runnable threads than "
                   "cores that window lasts milliseconds.")
    out.append(f"\n![stop]({images}stop.png)\n")
    return "\n".join(out)


# ---------------------------------------------------------------------------
# 2d. What the service feels


def _ms(s: dict | None) -> str:
    return spread(s) if s else "—"


def _service_verdicts(r: dict) -> list[tuple[str, str, str, float, float, bool]]:
    """(load, step, figure, median, target, met) for every step of a
    single-function patch and every figure the target covers."""
    out = []
    stall = r["targets_ms"]["stall"]
    for load in r["loads"]:
        res = r["results"].get(load["label"], {})
        for step in SERVICE_SINGLE_STEPS:
            for key in ("tick_gap_ms", "sleeper_late_ms"):
                s = res.get(step, {}).get(key)
                if s:
                    out.append((load["label"], step, key, s["median"], stall, s["median"] <= stall))
    return out



def _step_title(result: dict, step: str) -> str:
    """A step's title as the series names it now (a result keeps the
    title of the run that made it; the steps are the same)."""
    return SERVICE_STEP_TITLES.get(step) or result["step_titles"][step]

def _service_verdict(r: dict, res: dict, step: str) -> str:
    """Met, or for each figure that missed whether the quiet window misses
    too and the step adds no more than the target to it (the machine's) or
    not (hotpatch's), and then what would close it (``service.STEP_CAUSES``)."""
    stall = r["targets_ms"]["stall"]
    missed, ours = [], False
    for key, name in (("tick_gap_ms", "Python"), ("sleeper_late_ms", "native")):
        figure, control = res.get(key), res.get(f"control_{key}")
        if not figure or figure["median"] <= stall:
            continue
        quiet = control["median"] if control else 0.0
        if quiet > stall and figure["median"] - quiet <= stall:
            missed.append(f"{name}: the quiet window's {num(quiet, ' ms')} too, the machine's")
        else:
            missed.append(f"{name}: hotpatch's, {num(figure['median'] - quiet, ' ms')} over the "
                          f"quiet window")
            ours = True
    if not missed:
        return "met"
    verdict = "**not met** (" + "; ".join(missed) + ")"
    if ours:
        return verdict + ": " + SERVICE_STEP_CAUSES.get(step, "")
    return (verdict + ": threads beyond the cores wait for a CPU, the interpreter switches every "
            f"{num(r.get('switch_interval_ms', 5.0))} ms; no patcher closes it")


def _service_verdict_tables(r: dict) -> list[str]:
    """Per load, each step of a single-function patch: its worst Python gap
    and native pause beside the quiet window's, and the verdict."""
    stall = r["targets_ms"]["stall"]
    out = [f"**Verdicts.** Target: no step of a single-function patch (the first one "
           f"included) stalls the service's Python threads (the ticker's gap) or pauses its "
           f"native threads (the sleeper's lateness) more than {num(stall)} ms (medians). "
           f"The ticker's gap includes its own 1 ms sleep; a step that runs Python longer than "
           f"the switch interval ({num(r.get('switch_interval_ms', 5.0))} ms) keeps the other "
           f"threads waiting that long, whatever the code. With busy threads, a step that keeps "
           f"a core busy also makes the ticker and the sleeper wait for a CPU, which the quiet "
           f"window (nothing running) does not show. *hotpatch adds*: the step's median minus "
           f"the quiet window's.", ""]
    columns = ["step", "Python gap: step / quiet", "adds", "native pause: step / quiet", "adds",
               "verdict"]
    for load in r["loads"]:
        res = r["results"].get(load["label"])
        if res is None:
            continue
        rows = []
        for step in SERVICE_SINGLE_STEPS:
            s = res.get(step)
            if not s:
                continue
            cells = [_step_title(r, step)]
            for key in ("tick_gap_ms", "sleeper_late_ms"):
                figure, control = s.get(key), s.get(f"control_{key}")
                cells.append(f"{num(figure['median']) if figure else '—'} / "
                             f"{num(control['median']) if control else '—'}")
                cells.append(num(figure["median"] - control["median"])
                             if figure and control else "—")
            cells.append(_service_verdict(r, s, step))
            rows.append(cells)
        out += [f"*{load['label']}*:", "", table(columns, rows), ""]
    first = [(load["label"], r["results"].get(load["label"], {}).get("first_register", {})
              .get("wall_ms")) for load in r["loads"]]
    out += ["First register() (wall) under " + num(r["targets_ms"]["first_patch"]) + " ms: "
            + ", ".join(f"{label} {num(w['median'], ' ms')} "
                        f"({'met' if w['median'] < r['targets_ms']['first_patch'] else 'not met'})"
                        for label, w in first if w) + ".", ""]
    return out


def service_section(r: dict, images: str) -> str:
    head = "## 2d. What the service feels: stalls while it is patched\n\n"
    if "failed" in r:
        return head + "The series failed:\n\n```\n" + r["failed"] + "\n```\n"
    out = [head.rstrip(), "",
           f"`python -m benchmarks --only service` (`benchmarks/service.py`): {r['children']} fresh "
           "child processes per load, loads interleaved, each playing a service that takes the "
           "steps below in order. Its threads: a **Python ticker** (sleeps 1 ms in a loop; its "
           "longest gap overlapping the step is how long the service's Python threads could not "
           "run: the GIL held, or no CPU), a **native sleeper** (a C thread waking every 1 ms on "
           "absolute deadlines; its worst lateness is what a native thread felt: held by a stop, "
           "or waiting for a CPU) and 0, 2 or 8 **busy** native threads spinning in C (the load; "
           "their longest gap is shown too). *Control*: the same figures over a quiet window as "
           "long as the step, right after it (what the machine does with nothing happening: with "
           "more busy threads than the 2 cores, every thread waits for a CPU for whole scheduler "
           "slices anyway). Figures are median [quartiles] in ms over the children.",
           "",
           f"- The machine is shared: 1-minute load average {r['loadavg'][0]} when the series "
           f"started, {r['loadavg'][1]} when it ended.",
           "- *first register()* is the first patch of the process: libz's `crc32` sent to libz's "
           "`adler32` (loaded objects listed, libz's symbol table read, its branch index built, "
           "the loader hook installed, the site written through its hot-patch point: no stop, "
           "no ptrace helper). *import the core* is the first use of "
           "`hotpatch.register`: `import hotpatch` itself imports only the errors and the lazy "
           "names.",
           "- hotpatch runs from compiled bytecode, as an installed package does (the series "
           "compiles its `__pycache__` first): compiling a module at import holds the GIL "
           "for all of it.", ""]
    columns = ["step", "wall ms", "Python tick gap ms", "control", "native sleeper late ms",
               "control", "busy gap ms", "control"]
    for failure in r.get("failures", []):
        out.append(f"- **A child failed** ({failure['load']}), left out of the figures: "
                   f"{failure['error']}")
    if r.get("failures"):
        out.append("")
    for load in r["loads"]:
        res = r["results"].get(load["label"])
        if res is None:
            continue
        rows = []
        for step in r["steps"]:
            s = res.get(step)
            if not s:
                continue
            rows.append([_step_title(r, step), _ms(s.get("wall_ms")), _ms(s.get("tick_gap_ms")),
                         _ms(s.get("control_tick_gap_ms")), _ms(s.get("sleeper_late_ms")),
                         _ms(s.get("control_sleeper_late_ms")), _ms(s.get("busy_gap_ms")),
                         _ms(s.get("control_busy_gap_ms"))])
        out += [f"**{load['label']}** ({load['busy']} busy native threads):", "", table(columns, rows), ""]
    out += _service_verdict_tables(r)
    out.append(f"![service]({images}service.png)\n")
    return "\n".join(out)


# ---------------------------------------------------------------------------
# 3. Series owned elsewhere


def _external_body(result) -> str:
    """A series that describes itself with tables, else its data."""
    if isinstance(result, dict) and isinstance(result.get("tables"), list):
        parts = []
        for t in result["tables"]:
            parts += [f"**{t.get('title', '')}**", "", table(t["columns"], t["rows"]), ""]
            parts += [f"- {n}" for n in t.get("notes", [])]
        return "\n".join(parts)
    text = json.dumps(result, indent=1, default=str)
    return "```json\n" + (text if len(text) < 3000 else text[:3000] + "\n...") + "\n```"


def external_section(name: str, title: str, r: dict | None) -> str:
    head = f"## {title}\n\n"
    if r is None or "missing" in r:
        why = r["missing"] if r else "not run"
        return head + f"Not measured yet: {why}. The suite runs it as soon as it exists.\n"
    if "failed" in r:
        return head + "The series failed:\n\n```\n" + r["failed"] + "\n```\n"
    return head + _external_body(r["external"]) + "\n"


# ---------------------------------------------------------------------------
# Targets


def _target(name: str, measured: str, met: bool | None) -> list[str]:
    return [name, measured, "—" if met is None else ("met" if met else "**not met**")]


_ONE_CALL_WHAT = {"hop": "an entry of several instructions (f_*)",
                  "unstopped": "an entry that needs no stop (u_*)",
                  "hop_idle": "an entry of several instructions (f_*), an idle thread there",
                  "unstopped_idle": "an entry that needs no stop (u_*), an idle thread there"}
_ONE_CALL_SHORT = {"hop": "f_*", "unstopped": "u_*", "hop_idle": "f_*, idle thread",
                   "unstopped_idle": "u_*, idle thread"}


def _one_function_targets(where: str, ours: dict, theirs: dict | None,
                          limit_us: float) -> list[list[str]]:
    """One site < 50 µs and, where Frida gave a figure, 10x Frida's replace
    of one function at a time (the same kind of function, timed the same
    way), for one way of redirecting one function (``where``)."""
    rows = [_target(f"one site applied in < 50 µs: {where}", num(ours["median"], " µs"),
                    ours["median"] < limit_us)]
    if theirs:
        x = theirs["median"] / ours["median"]
        rows.append(_target(f"apply ≥ 10x faster than Frida's replace, 1 function at a time: {where}",
                            f"{num(x)}x", x >= 10))
    return rows


def _frida_one_call(ap: dict, threads: str, kind: str) -> dict | None:
    """Frida's replace of one function at a time (its summary), the
    functions of one-call ``kind``, with ``threads`` busy threads."""
    return ap.get("frida_one_call", {}).get(threads, {}).get(kind)


def _times(theirs: dict | None, ours: dict | None) -> str:
    """How many times faster than Frida, as a table cell ("—" without both)."""
    return f"{num(theirs['median'] / ours['median'])}x" if theirs and ours else "—"


def _one_call_targets(ap: dict, limit_us: float) -> list[list[str]]:
    """The one-call path (``sites.redirect``), with 0, 2 and 8 busy threads."""
    rows = []
    for threads, kinds in ap.get("hotpatch_one_call", {}).items():
        for kind in ONE_CALL_KINDS:
            if kinds.get(kind):
                rows += _one_function_targets(
                    f"one call (`sites.redirect`), {_ONE_CALL_WHAT[kind]}, {threads} busy threads",
                    kinds[kind], _frida_one_call(ap, threads, kind), limit_us)
    return rows


def _apply_ratio_targets(ap: dict) -> list[list[str]]:
    """Apply ≥ 10x faster than Frida's replace per function, at 1, 100 and
    10,000 functions, with 0, 2 and 8 busy threads."""
    rows = []
    for threads in map(str, ap.get("threads", [])):
        ours = ap.get("hotpatch", {}).get(threads, {}).get("apply", {})
        theirs = ap.get("frida", {}).get(threads, {}).get("replace_install", {})
        for count in ("1", "100", "10000"):
            if ours.get(count) and theirs.get(count):
                x = theirs[count]["median"] / ours[count]["median"]
                functions = "1 function (a single call in the counts' order, cold, for both)" \
                    if count == "1" else f"{int(count):,} functions"
                rows.append(_target(f"apply ≥ 10x faster than Frida's replace per function, "
                                    f"{functions}, {threads} busy threads",
                                    f"{num(x)}x", x >= 10))
    return rows


def targets_section(series: dict) -> str:
    rows = []
    ov = series.get("overhead", {})
    if "timing" in ov:
        d, cg = ov["timing"]["delta_ns"], ov["instructions"].get("per_call", {})
        di = {m: cg[f"direct/{m}"] - cg[f"limit/{m}"] for m in METHODS if f"direct/{m}" in cg}
        dn = {m: d[f"direct/{m}"]["median"] for m in METHODS}
        rows.append(_target("direct path indistinguishable from the direct call (+1 instruction, < 0.05 ns)",
                            ", ".join(f"{m}: {signed(dn[m], ' ns')}, {signed(di[m]) if m in di else '?'} instr."
                                      for m in METHODS),
                            all(abs(dn[m]) < 0.05 for m in METHODS) and all(round(v) <= 1 for v in di.values())))
        sn = {m: d[f"slot/{m}"]["median"] for m in METHODS}
        rows.append(_target("slot path < 0.3 ns over the direct call",
                            ", ".join(f"{m}: {signed(sn[m], ' ns')}" for m in METHODS),
                            all(v < 0.3 for v in sn.values())))
        if "plt_slot/rel32" in cg and "plt_limit/rel32" in cg:
            pi = cg["plt_slot/rel32"] - cg["plt_limit/rel32"]
            pn = d["plt_slot/rel32"]["median"]
            rows.append(_target("a patched function called through a PLT costs the same instructions "
                                "as an unpatched one",
                                f"{signed(pi)} instr., {signed(pn, ' ns')}", round(pi, 2) == 0))
        flat = {m: d[f"stack16/{m}"]["median"] - d[f"stack1/{m}"]["median"] for m in METHODS}
        rows.append(_target("stacks of 1, 4, 16 patches flat",
                            ", ".join(f"{m}: 16 vs 1 {signed(flat[m], ' ns')}" for m in METHODS),
                            all(abs(v) < 0.05 for v in flat.values())))
    ap = series.get("apply", {})
    zero = ap.get("hotpatch", {}).get("0", {})
    if zero:
        for count, limit_us, name in ((1, 50, "one site applied in < 50 µs"),
                                      (1000, 10e3, "1,000 sites in one batch in < 10 ms")):
            whole, write = zero["apply"].get(str(count)), zero["write"].get(str(count))
            # The counts' batch of one site is a single call, cold: the
            # series rotates its order, so it follows the 10,000 batch.
            cold = ", a single call in the counts' order (cold)" if count == 1 else ""
            if whole:
                rows.append(_target(f"{name}: the whole apply (analysis + write), no busy "
                                    f"thread{cold}",
                                    num(whole["median"], " µs"), whole["median"] < limit_us))
                rows.append(_target(f"{name}: the write alone (analysis done before), no busy "
                                    f"thread{cold}",
                                    num(write["median"], " µs"), write["median"] < limit_us))
            unstopped = ap.get("hotpatch_unstopped", {}).get("0")
            if count == 1 and unstopped:
                for phase, what in (("apply", "the whole apply"), ("write", "the write alone")):
                    rows.append(_target(f"{name}: {what}, an entry that needs no stop, no busy "
                                        "thread", num(unstopped[phase]["median"], " µs"),
                                        unstopped[phase]["median"] < limit_us))
            if count == 1:
                rows += _one_call_targets(ap, limit_us)
        k = growth({c: s["median"] for c, s in zero["apply"].items()})
        if k is not None:
            rows.append(_target("apply linear in the count", f"time ∝ count^{k:.2f}", 0.85 <= k <= 1.15))
    rows += _apply_ratio_targets(ap)
    sv = series.get("service", {})
    if "results" in sv:
        verdicts = _service_verdicts(sv)
        for load in sv["loads"]:
            mine = [v for v in verdicts if v[0] == load["label"]]
            worst = max(mine, key=lambda v: v[3]) if mine else None
            if worst:
                control = sv["results"][load["label"]][worst[1]].get(f"control_{worst[2]}")
                rows.append(_target(
                    f"no step of a 1-function patch stalls the service > {num(worst[4])} ms, "
                    f"{load['label']} (worst median: Python tick gap or native sleeper)",
                    f"{num(worst[3], ' ms')} ({_step_title(sv, worst[1])}; control "
                    f"{num(control['median'], ' ms') if control else '—'})",
                    all(v[5] for v in mine)))
            first = sv["results"].get(load["label"], {}).get("first_register", {}).get("wall_ms")
            if first and load["busy"] in (0, 8):
                rows.append(_target(f"first patch < {num(sv['targets_ms']['first_patch'])} ms "
                                    f"including symbol resolution, {load['label']}",
                                    num(first["median"], " ms"),
                                    first["median"] < sv["targets_ms"]["first_patch"]))
    st = series.get("stop", {})
    if "results" in st:
        for label, method, key, median, target, met in _stop_verdicts(st):
            rows.append(_target(f"median pause of a stop < {num(target, ' µs')}, {label} threads on "
                                f"2 cores, {STOPPERS[method]} ({_FIGURE[key]})",
                                num(median, " µs"), met))
    return "## Targets\n\n" + table(["target", "measured", "verdict"], rows) + "\n"


# ---------------------------------------------------------------------------
# Plots


def _plot_overhead(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt
    timing, counts = r["timing"], r["instructions"].get("per_call", {})
    ns = timing["ns_per_call"]
    keys = [v.key for v in VARIANTS if any(f"{v.key}/{m}" in ns for m in METHODS)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.42 * len(keys) + 1.6), sharey=True)
    for ax, data, title in ((axes[0], {k: s["median"] for k, s in ns.items()}, "ns per call (log)"),
                            (axes[1], counts, "instructions per call, loop included (log)")):
        for i, method in enumerate(METHODS):
            ys = [j + (i - 0.5) * 0.38 for j in range(len(keys))]
            xs = [data.get(f"{k}/{method}", 0) for k in keys]
            bars = ax.barh(ys, xs, height=0.38, label={"ptr": "through a pointer",
                                                        "rel32": "call rel32"}[method])
            for bar, x in zip(bars, xs):
                if x:
                    ax.text(x * 1.05, bar.get_y() + bar.get_height() / 2, num(x), va="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(keys)), [BY_KEY[k].label for k in keys], fontsize=8)
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Overhead per call: every variant ends in the same new_fn")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_apply(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    styles = {"0": "-", "2": "--", "8": ":"}
    lines = [("hotpatch", "apply", "hotpatch apply", "C0"), ("hotpatch", "write", "hotpatch write only", "C2"),
             ("frida", "replace_install", "Frida replace", "C3"),
             ("frida", "replaceFast_install", "Frida replaceFast", "C1")]
    for tool, phase, name, color in lines:
        for threads in map(str, r["threads"]):
            series = r.get(tool, {}).get(threads, {}).get(phase) if "skipped" not in r.get(tool, {}) else None
            if not series:
                continue
            counts = sorted(int(c) for c in series)
            med = [series[str(c)]["median"] for c in counts]
            kw = dict(color=color, linestyle=styles.get(threads, "-"), marker="o", markersize=3,
                      label=f"{name}, {threads} busy threads")
            axes[0].plot(counts, med, **kw)
            axes[1].plot(counts, [m / c for m, c in zip(med, counts)], **kw)
    for ax, title in ((axes[0], "total µs (log-log)"), (axes[1], "µs per function (log-log)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("functions in one patch")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("Apply latency: hotpatch vs Frida (solid: no busy thread; dashed: 2; dotted: 8)")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_reach(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt
    libs = [(label, lib) for label, lib in r["libraries"].items() if "missing" not in lib]
    tools = [("hotpatch", "hotpatch"), ("frida_replace", "Frida replace"),
             ("frida_replaceFast", "Frida replaceFast")]
    fig, ax = plt.subplots(figsize=(10, 1.0 * len(libs) + 1.5))
    for i, (key, name) in enumerate(tools):
        ys = [j + (i - 1) * 0.27 for j in range(len(libs))]
        xs = [100 * lib[key]["ok"] / max(lib[key]["total"], 1) if key in lib else 0 for _, lib in libs]
        bars = ax.barh(ys, xs, height=0.27, label=name)
        for bar, x in zip(bars, xs):
            ax.text(x + 0.5, bar.get_y() + bar.get_height() / 2, f"{x:.1f}%", va="center", fontsize=7)
    ax.set_yticks(range(len(libs)), [f"{label}\n({lib['functions']:,} functions)" for label, lib in libs],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("% of functions patchable")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Reach: share of each library's functions accepted")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_stop(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt
    loads = [l for l in r["loads"] if l["label"] in r["results"]]
    methods = r["methods"]
    colors = {"ptrace": "C0", "signals": "C1"}
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    ax = axes[0]
    width = 0.27
    seen = set()
    for j, load in enumerate(loads):
        res = r["results"][load["label"]]
        key = pause_key(load["busy"])
        for i, method in enumerate(methods):
            s = res[method]["one"][key]
            if not s:
                continue
            x = j + (i - 0.5) * width
            ax.bar(x, s["median"], width, color=colors[method],
                   label=f"{STOPPERS[method]}: median, whisker to p90, dot: max" if j == 0 else None)
            ax.plot([x, x], [s["median"], s["p90"]], color="black", lw=1)
            ax.plot([x], [s["max"]], marker="o", color=colors[method], markeredgecolor="black", ms=4)
            ax.text(x, 12, num(s["median"]), ha="center", va="bottom", fontsize=7,
                    rotation=90, color="white")
        control = [res[m]["one"]["control_gap_us"] for m in methods if load["busy"]]
        control = [c["median"] for c in control if c]
        if control:
            x = j + 1.5 * width
            ax.bar(x, statistics.median(control), width, color="0.75", hatch="//",
                   label="control: same gap, nothing written (median)" if "c" not in seen else None)
            seen.add("c")
        target = r["targets_us"].get(load["label"])
        if target:
            ax.plot([j - 1.5 * width, j + 1.5 * width], [target, target], color="red", lw=2,
                    label="target (median)" if "t" not in seen else None)
            seen.add("t")
    ax.set_xticks(range(len(loads)),
                  [f"{l['label']}\n({'busy gap' if l['busy'] else 'core stop time'})" for l in loads],
                  fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(bottom=10)
    ax.set_ylabel("µs (log)")
    ax.set_title("Pause of a 1-site stop for the other threads")
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
    ax = axes[1]
    kinds = [("apply1", "1 site"), ("apply1000", f"{r['big']:,} sites")]
    width = 0.2
    for j, load in enumerate(loads):
        res = r["results"][load["label"]]
        for k, (kind, name) in enumerate(kinds):
            for i, method in enumerate(methods):
                s = res[method]["latency_us"][kind]
                if not s:
                    continue
                x = j + (2 * k + i - 1.5) * width
                ax.bar(x, s["median"], width, color=colors[method], alpha=1.0 if k == 0 else 0.55,
                       label=f"{STOPPERS[method]}, {name}" if j == 0 else None)
                ax.plot([x, x], [s["median"], s["p90"]], color="black", lw=1)
    ax.set_xticks(range(len(loads)), [l["label"] for l in loads], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("µs (log)")
    ax.set_title("Apply latency: redirect_batch wall time (median, whisker to p90)")
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Stops of the world: ptrace helper vs signal stop, interleaved in the same processes "
                 f"(load average {r['loadavg'][0]}–{r['loadavg'][1]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_service(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt
    steps = r["steps"]
    fig, axes = plt.subplots(1, len(r["loads"]), figsize=(5 * len(r["loads"]), 6), sharey=True)
    for ax, load in zip(axes, r["loads"]):
        res = r["results"].get(load["label"], {})
        for i, (key, name, color) in enumerate((("tick_gap_ms", "Python tick gap", "C0"),
                                                ("control_tick_gap_ms", "its control", "C9"),
                                                ("sleeper_late_ms", "native sleeper late", "C3"),
                                                ("control_sleeper_late_ms", "its control", "C1"))):
            ys = [j + (i - 1.5) * 0.2 for j in range(len(steps))]
            xs = [max((res.get(s, {}).get(key) or {}).get("median", 0), 0.01) for s in steps]
            ax.barh(ys, xs, height=0.2, color=color, label=name)
        ax.axvline(r["targets_ms"]["stall"], color="k", linestyle="--", linewidth=1,
                   label="target (1-function steps)")
        ax.set_xscale("log")
        ax.set_title(f"{load['label']}: ms (log, median)")
        ax.grid(alpha=0.3, axis="x", which="both")
    axes[0].set_yticks(range(len(steps)))
    axes[0].set_yticklabels([_step_title(r, s)[:48] for s in steps], fontsize=8)
    axes[0].invert_yaxis()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
    fig.suptitle("What the service feels while it is patched: longest stall per step")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(series: dict, out_dir: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    for name, plot in (("overhead", _plot_overhead), ("apply", _plot_apply), ("reach", _plot_reach),
                       ("stop", _plot_stop), ("service", _plot_service)):
        r = series.get(name)
        if r and "failed" not in r:
            plot(r, os.path.join(out_dir, f"{name}.png"))


# ---------------------------------------------------------------------------
# Documents


def machine_section(results: dict) -> str:
    m = results.get("machine", {})
    series = results["series"]
    def where(r: dict) -> str:
        """"" for the latest run, else the commit (and machine) it ran on."""
        other = r.get("machine") or {}
        if r.get("commit") == m.get("commit") and other.get("date", m.get("date")) == m.get("date"):
            return ""
        text = f"at {r.get('commit')}"
        if other and (other.get("cpu"), other.get("kernel")) != (m.get("cpu"), m.get("kernel")):
            text += f" on {other.get('cpu')}, Linux {other.get('kernel')}, {other.get('date')}"
        return text

    groups = {}
    for name, r in series.items():
        groups.setdefault(where(r), []).append(
            f"{name} {r.get('seconds', '?')} s{' (quick)' if r.get('quick') else ''}")
    runs = "; ".join((f"{place}: " if place else "") + ", ".join(names)
                     for place, names in sorted(groups.items()))
    return "\n".join([
        f"- Run {m.get('date')} on commit `{m.get('commit')}`; series: {runs}.",
        f"- CPU: {m.get('cpu')}, {m.get('cores')} cores (shared, noisy: medians of alternating repeats).",
        f"- Linux {m.get('kernel')}, {m.get('glibc')}, Python {m.get('python')}, {m.get('cc')}.",
        f"- {m.get('valgrind') or 'no valgrind'}; Frida {m.get('frida') or 'not installed'}.",
    ]) + "\n"


def sections(results: dict, images: str) -> str:
    series = results["series"]
    parts = [targets_section(series)]
    for name, render in (("overhead", overhead_section), ("apply", apply_section), ("reach", reach_section),
                         ("stop", stop_section), ("service", service_section)):
        if name in series:
            parts.append(render(series[name], images))
    parts.append(external_section("symbols", "3. Symbol resolution (first and cached)", series.get("symbols")))
    parts.append(external_section("loader", "3b. Loader hook on dlopen", series.get("loader")))
    return "\n".join(parts)


README = """# hotpatch benchmarks

Generated by `python -m benchmarks` from the committed code: do not edit by hand
(the template is in `benchmarks/report.py`). These are not timed tests: they measure
hotpatch side by side with its peers (GOT/PLT interposition, Frida's Interceptor) in
one run, on a shared machine, so every figure is a median of alternating repeats with
its spread, and instruction counts (callgrind) stand beside the times where they are
steadier.

## The latest run

{machine}
## How to reproduce

```sh
pip install -e '.[bench]'          # matplotlib and frida (optional: without it the suite says so)
python -m benchmarks               # the full run (about 6 minutes; the stop series about 2)
python -m benchmarks --quick       # a smoke run of about a minute
python -m benchmarks --only apply  # one series (overhead, apply, reach, stop, service, symbols, loader)
python -m benchmarks --report-only # tables, plots and this file again from results/results.json
```

Needs `cc`, `objdump`, `readelf` and `nm` (binutils); `valgrind` for instruction counts.
Results go to `benchmarks/results/` (`results.json`, `results.md`, `*.png`); compiled
drivers to `benchmarks/build/` (not committed).

## Where hotpatch is behind, and what would close it

The tables below mark every figure where hotpatch is behind a peer or a target.

- **The direct path costs one taken `jmp`.** That is +1 instruction, a few tenths
  of a nanosecond here, not the design's < 0.05 ns. Frida's `replaceFast` and
  GOT/PLT interposition put the same one instruction in the path and measure
  the same. Removing it would mean rewriting every caller's `call rel32`
  instead of the entry, which is a different design.
- **The slot path is slower called through a pointer.** Two indirect branches
  back to back cost more there than by `call rel32`. The default uses the slot
  only when the new code is out of ±2 GiB reach. Loading patch code near its
  target (near allocation for patch modules and callback thunks) would make the
  direct form always possible.
- **The call path is above the design's ~5.5 ns.** Its `call` never returns,
  so the patched function's `ret` is mispredicted (the design accepts that).
  On top of that, a site with no observer pays an assembly fast path: a table
  lookup by return address, then a jump. A site with observers also saves the
  argument registers and calls the C dispatch. The call form is only used
  while a site has observers. Two things would close the rest: a per-site
  thunk in place of the shared table lookup, and saving only what an observer
  needs.
- **Apply is more than 10x Frida's `replace` per function at 100 and
  10,000 functions, with 0, 2 and 8 busy threads (10-62x over session 10's
  four runs on an AMD EPYC machine, 11-39x in sessions 11-13's runs on an
  Intel Xeon one, wherever Frida kept the process alive to give a
  figure); 1,000 sites take 3.3-5.2 ms.  Where a count's functions have no
  padding and busy threads run, the batch takes a stop, and with 8 busy
  threads on 2 cores one stop costs 0.5-8 ms: 100 functions fell to 2.8x
  and 8.4x in two of session 11's three runs, to 7.6x in one of session
  12's four, and to 7.6x and 5.0x in session 13's two full runs.  At 1 function, one call
  (`sites.redirect`) is 10x Frida's `replace` with no busy thread since
  session 13: 10.5-11.0x over its last four runs, f_\* 10.3-11.5 µs and
  u_\* 9.8-10.9 against Frida's 108-121 (the sites near an address went
  into the C core, `native/nearby.c`, and two Python calls came out of
  the path; on the C index alone, four runs gave 9.3-10.6x, the lowest
  where Frida's own figure was unusually low, 91-99 µs).  Frida is timed one function at
  a time, warm, as the one-call path is (16 functions never patched
  before, the median of the last 8), the call alone for both (Frida's
  clock starts after its module and addresses are resolved; hotpatch's
  lookup of the object, 1.2-1.4 µs, is a column of its own).  Earlier
  sessions compared the one-call path with the 1-function count, a single
  cold call after 10,000 functions, and so reported 10x where it was not
  (session 12).  Where it is not met:
  - *An idle thread in the process* (beyond the issue's settings: real
    services have one): f_\* 18.5-20.5 µs (5.6-6.1x), u_\* 16.0-17.6 µs
    (6.4-6.9x).  The write is no longer alone: f_\* go through the
    hot-patch point, a core sync before and after the entry's atomic
    store (the *kernel floor* column: 4 µs here; the store's `mprotect`
    window alone, which splits the code's mapping and merges it back and
    takes a page fault, is 3 µs), and a sweep of the function before,
    decoded by capstone, proves the padding dead (22,000 instructions).
    The C call alone is 14.6 µs (f_\*) and 10.8 µs (u_\*) cold, where 10x
    allows 11 µs for the whole redirect, Python included: with capstone
    as the decoder and these writes, not on this machine.
  - *Busy threads:* each of the floor's four system calls interrupts the
    CPUs running the process's other threads and waits for them (both
    `mprotect`s flush the TLB on x86: the write permission changes), about
    15 µs an interrupt on the Intel machine, and the patching thread shares
    2 cores with those threads: the floor is 62-70 µs there (24-27 µs on
    the AMD one), so no safe write goes under 50 µs, nor under a third of
    Frida's time (1.8-2.5x).  That is the machine.
  - *The 1-function count*, a single call after the 10,000-function batch
    (the series rotates its order, so it always follows that batch), cold
    for both tools: 1.0-1.2x with no busy thread.  In those caches a cffi
    call to a C function that returns a counter takes 1.6-2.2 µs (0.09
    warm) and three nested Python calls 1.5-2.6 µs; 10x Frida's cold
    149-185 µs would be 15-18 µs for the batch path's two calls
    (`prepare_batch`, `redirect_batch`), about ten cold calls' worth.
    With busy threads its functions have no padding, so it takes a stop
    (0.03-0.5x Frida, which writes without stopping and crashed the
    process in 5 of 5 runs with busy threads).  `sites.redirect` is the
    API for one function.

  What a cold first redirect spends (one thread, session 13): the C call
  about 6 µs, 15,000 instructions by callgrind, 10,600 of them capstone's
  five decodes of the entry's function (870 of each formatting the text,
  which capstone 5.0 cannot turn off), and eleven system calls; the
  Python around it about 3.5 µs: the lock 0.7, the plan's record made an
  `EntryPlan` 1.0, the `Site` 0.6, the rest in calls.  Each Python
  function a cold call enters costs 0.2-0.4 µs (its code and frame
  fetched again).

  The plans and original stubs of the common entry shapes are built by
  one call of the C core per batch (`native/plan.c`), reading a batch's
  entries as spans; the entry writes of a batch by another.  What remains
  per function: capstone's decode in the C scan (about a third of its
  instructions go to formatting text), two Python objects and a packed
  record per site.  Without busy threads the counts' child has one thread
  and writes with nothing to stop (`stops.alone`).
- **The livepatch model's `register()` of one function, what a user
  calls, is slower than Frida's `replace` of one function warm** (shown
  beside the targets, which are the apply's): 116-129 µs with no busy
  thread and 201-240 µs with busy ones, 0.71-0.99x Frida's warm figure in
  session 12 (sessions 10-11 gave 0.9-1.5x against the cold one), and
  about the same in session 13's committed run.  It
  goes the batch way, in pieces with Python between them (timed in
  session 12, with no busy thread and the loader's worker thread
  there): the analysis and original stub (`prepare_batch`, 22 µs), the
  search for the hot-patch point, made early to decide whether to start
  the stopper (14 µs), the write (`update_batch`: the point's `jmp`, then
  the entry, 40 µs; since in one hold of the core's lock, as the one-call
  path writes them, about 5 µs less), the pass over every loaded object's
  PLT slots (15-18 µs), and the lifecycle around them: resolving the
  symbol, the loader hook's names, the crash report, callbacks and
  notifications.  The
  one-call path does the analysis, the point and the write in one call of
  the C core (10-20 µs); the model keeps them apart because its
  `pre_patch` callbacks run between the analysis and the write, as the
  kernel's do.  A C path for the model's common case (one object, first
  installs) would close most of it.
- **What the service feels (section 2d).**  Idle, no step of a
  one-function patch stalls the service's threads 5 ms (2.3-3.6 ms at most
  over sessions 10-13).  With busy threads one step does: the
  first use of `hotpatch.register`, which imports the core (about 65
  modules, 22-34 ms of module bodies idle, 44-70 ms with 2 busy threads),
  stalls the Python ticker 5.3-7.2 ms with 2 busy threads and 7.4-17.6 ms
  with 8 over sessions 10-13.  The import gives the GIL up every 2 ms, but with more runnable
  threads than cores the scheduler takes the CPU from it while it holds
  the GIL, and the ticker waits for it to run again: `perf sched` showed
  the importing thread runnable and waiting 5.0 ms for a CPU while both
  were taken by busy threads (the longest gaps fall at random points of
  its module bodies, not in one long call).  Importing a third less
  (logging, typing, dataclasses, inspect and difflib imported before)
  moved the median gap by 0-1 ms and left the tail at 6-10 ms; with 8
  busy threads the quiet window's own stall has been 0-5 ms from run to
  run.  Loading a C patch module crossed 5 ms with 2 busy threads in one
  run of four in session 10 and in two of four full runs in session 12
  (6.1-6.9 ms): only its `register()` ran at the short switch interval,
  so the ticker waited the default 5 ms for the GIL while the module's
  symbols, digest and descriptor were read.  Since session 13 the whole
  load runs at 1 ms (and no longer imports `subprocess`, which only
  `hotpatch build` needs): over five service runs the median gap with 2
  busy threads was 1.5-3.8 ms over eight runs (its `register()` takes no stop: adler32's
  entry goes through its hot-patch point).  The first
  `register()` of the process (libz's `crc32`) takes no stop and spawns no
  helper: its entry goes through its hot-patch point (`native/hop.c`); it
  takes 2.3-3.7 ms idle and 2.4-18.6 ms with 8 busy threads over the runs
  (the CPU share a thread gets among 10 on 2 cores varies that much).  Its
  first code write does not wait for the rest of an RCU grace period (the
  membarrier registration, `native/ahead.c`, starts where the core's
  import starts; a batch that comes sooner waits for that registration,
  not for one of its own).  Small batches scan an object's code for bytes that
  could branch into their entries three times (0.4 ns a byte), then build
  its branch index and ask it.  The verdict table of section 2d says, per
  step and load, which and why.
- **A stop of the world costs the other threads hundreds of µs, and more
  with more busy threads than cores.** Restoring or retargeting an entry,
  a first patch of an entry whose first instruction covers the write, and
  one through a hot-patch point (a `jmp` in the dead padding before the
  entry, a 2-byte `jmp` to it over the first instruction; together 58-73 %
  of the functions of libz, libcrypto, libpython and `_decimal`, section
  2b), are one atomic store of one instruction: no stop
  (`native/unstopped.c`, `native/hop.c`). Any other first patch happens in a stop
  (section 2c): the ptrace helper or the signal stop holds every other thread
  while the bytes are written. Most of a stop is getting the threads stopped
  and letting them go, not the write. With more busy threads than cores each
  also waits for a CPU, as it does without any stop (the section's control).
  Frida does not stop threads, and it crashed processes under this load.
  Section 2c says what would shorten each part.
- **A Python callable as the replacement costs a cffi callback per call** (the
  GIL and argument conversion). A C patch module (`hotpatch build`) avoids it.

{sections}"""


def write(results: dict, out_dir: str, readme: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    write_plots(results["series"], out_dir)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("# Benchmark results\n\n" + machine_section(results) + "\n" + sections(results, ""))
    with open(readme, "w") as f:
        f.write(README.format(machine=machine_section(results), sections=sections(results, "results/")))
