#!/usr/bin/env python3
"""Issue #9's report from `bench/gpu/serving.sh` output.

    serving_report.py OUT_DIR... --prefix bench/results/serving-h200

Reads each OUT_DIR's serving.json (`deltazip bench serve` rows) and runs.jsonl (one line per server
run: GPU memory after the run, the server's tier counters), and writes PREFIX.json (a list of objects:
system, n_models, popularity, rate, tokens_per_s, requests_per_s, ttft_p50_s, ttft_p99_s, tpot_p50_ms,
and the rest of each row), PREFIX.md (side-by-side tables and the issue's targets as measured ratios)
and PREFIX.png (throughput vs offered rate; needs matplotlib).
"""

import argparse
import json
import math
import os
import sys

REQUIRED = ["system", "n_models", "popularity", "rate", "tokens_per_s", "requests_per_s",
            "ttft_p50_s", "ttft_p99_s", "tpot_p50_ms"]
EXTRA = ["requests", "completed", "errors", "errors_by_kind", "tpot_p99_ms", "e2e_p50_s",
         "e2e_p99_s", "window_s", "tokens"]
ORDER = {"base": 0, "dz-4b24": 1, "dz-2b24": 2, "swap": 3, "swap-engines": 4}
# The swap baseline is the better of two systems (issue #9): full models copied in from CPU memory
# (`swap`) and the host's own unload/reload of merged engines (`swap-engines`).
SWAPS = ("swap", "swap-engines")


def better(*rows):
    rows = [r for r in rows if r and r.get("tokens_per_s") is not None]
    return max(rows, key=lambda r: r["tokens_per_s"], default=None)


def load(dirs):
    rows, runs = [], []
    for d in dirs:
        p = os.path.join(d, "serving.json")
        if os.path.exists(p):
            rows += json.load(open(p))
        p = os.path.join(d, "runs.jsonl")
        if os.path.exists(p):
            runs += [json.loads(l) for l in open(p) if l.strip()]
    return rows, runs


def run_for(row, runs):
    """The server run a row came from (the last one of its system, size and popularity)."""
    match = [r for r in runs if r["system"] == row["system"] and r["n_models"] == row["n_models"]
             and r["popularity"] == row["popularity"]]
    return match[-1] if match else None


def counter(run, prefix):
    if not run:
        return None
    vals = [v for k, v in run["metrics"].items() if k.split("{")[0] == prefix]
    return sum(vals) if vals else None


def sustained(r):
    """Whether the server kept up with the offered rate: every request answered and completions
    leaving at >= 80% of the arrival rate."""
    rate = r["rate"] if isinstance(r["rate"], (int, float)) else math.inf
    return r["errors"] == 0 and r["completed"] == r["requests"] and r["requests_per_s"] >= 0.8 * rate


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--prefix", required=True)
    args = ap.parse_args()
    rows, runs = load(args.dirs)
    if not rows:
        sys.exit("no rows")
    rows.sort(key=lambda r: (r["n_models"] if r["system"] != "base" else 0, r["popularity"],
                             ORDER.get(r["system"], 9), float(r["rate"])))
    out = []
    for r in rows:
        run = run_for(r, runs)
        o = {k: r.get(k) for k in REQUIRED + EXTRA}
        o["gpu_memory_used_mib"] = run["gpu_memory_used_mib"] if run else None
        o["delta_loads"] = counter(run, "deltazip_delta_loads_total")
        o["swap_loads"] = counter(run, "deltazip_swap_loads_total")
        o["engine_loads"] = counter(run, "deltazip_engine_swap_loads_total")
        o["sustained"] = sustained(r)
        o["run"] = r.get("run")
        out.append(o)
    with open(args.prefix + ".json", "w") as f:
        json.dump(out, f, indent=1)

    meta = out[0]["run"] or {}
    m = meta.get("machine", {})
    lines = [
        "# Serving on one H200: base + N deltas vs swapping full models vs base alone (issue #9)",
        "",
        f"- Machine: {m.get('cpu')} ({m.get('cores')} cores), GPU {' / '.join(sorted(set(str(m.get('gpu')).splitlines())))}",
        f"- Commit `{meta.get('commit')}`, {meta.get('date')}",
        f"- Workload: `deltazip bench serve`, {meta.get('length')} per rate (Poisson arrivals), prompts of "
        f"{meta.get('prompt_words')} words from a text corpus, max_tokens {meta.get('max_tokens')}, seed "
        f"{meta.get('seed')}; streamed completions. Model: 7B-shaped Llama, random weights "
        "(`deltazip synth`), bf16. Systems: `base` (every request to the base), `dz-4b24`/`dz-2b24` "
        "(N multi-tenant deltas, 4-/2-bit 2:4), `swap` (the same N fine-tunes as full merged models, "
        "a few on the GPU, the rest copied in from CPU memory on demand), `swap-engines` (the same N "
        "fine-tunes as merged models, one host engine each, a few loaded, the rest unloaded and reloaded "
        "by the host on demand); the targets compare with the better of the two swap systems.",
        "- Throughput = completed requests' streamed tokens over the rate's window (first arrival to last "
        "response). TTFT from each request's planned arrival. Sustained = every request answered and "
        "completions at >= 80% of the offered rate.",
        "",
        "| system | N | popularity | rate (req/s) | ok/sent | tokens/s | req/s | TTFT p50 (s) | TTFT p99 (s) "
        "| TPOT p50 (ms) | TPOT p99 (ms) | sustained | GPU mem (GiB) | delta/swap loads |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for o in out:
        loads = {"swap": o["swap_loads"], "swap-engines": o["engine_loads"]}.get(o["system"], o["delta_loads"])
        mem = None if o["gpu_memory_used_mib"] is None else o["gpu_memory_used_mib"] / 1024
        lines.append(
            f"| {o['system']} | {o['n_models']} | {o['popularity']} | {o['rate']} | "
            f"{o['completed']}/{o['requests']} | {fmt(o['tokens_per_s'], '.1f')} | "
            f"{fmt(o['requests_per_s'], '.2f')} | {fmt(o['ttft_p50_s'], '.3f')} | "
            f"{fmt(o['ttft_p99_s'], '.3f')} | {fmt(o['tpot_p50_ms'], '.1f')} | "
            f"{fmt(o['tpot_p99_ms'], '.1f')} | {'yes' if o['sustained'] else 'no'} | "
            f"{fmt(mem, '.1f')} | {fmt(loads, '.0f')} |")

    # The targets, as ratios at the same offered rate.
    lines += ["", "## Targets (same offered rate, side by side)", "",
              "| N | popularity | rate | dz system | dz tokens/s | swap tokens/s | dz / swap | base tokens/s "
              "| dz / base |", "|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    base = {float(o["rate"]): o for o in out if o["system"] == "base"}
    for o in out:
        if not o["system"].startswith("dz-"):
            continue
        sw = better(*(x for x in out if x["system"] in SWAPS and x["n_models"] == o["n_models"]
                      and x["popularity"] == o["popularity"] and x["rate"] == o["rate"]))
        b = base.get(float(o["rate"]))
        ratio = lambda a, c: None if not a or not c or not c["tokens_per_s"] else a["tokens_per_s"] / c["tokens_per_s"]
        lines.append(
            f"| {o['n_models']} | {o['popularity']} | {o['rate']} | {o['system']} | "
            f"{fmt(o['tokens_per_s'], '.1f')} | {fmt(sw and sw['tokens_per_s'], '.1f')} | "
            f"{fmt(ratio(o, sw), '.1f')}x | {fmt(b and b['tokens_per_s'], '.1f')} | "
            f"{fmt(ratio(o, b), '.0%')} |")
    # Capacity: each system's best throughput over the rates it was offered. A saturated system makes
    # about the same tokens/s at every rate past its capacity, so systems measured at different rates
    # (swap runs fewer, slower requests to fit a call) still compare here.
    best = {}
    for o in out:
        key = (o["system"], o["n_models"], o["popularity"])
        if o["tokens_per_s"] is not None and (key not in best or o["tokens_per_s"] > best[key]["tokens_per_s"]):
            best[key] = o
    base_best = max((o for k, o in best.items() if k[0] == "base"), key=lambda o: o["tokens_per_s"],
                    default=None)
    lines += ["", "## Capacity (best tokens/s over the offered rates)", "",
              "| system | N | popularity | best tokens/s | at rate | TPOT p50 (ms) | in flight (tokens/s x TPOT) "
              "| vs swap | vs base |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for (system, n, pop), o in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][2], ORDER.get(kv[0][0], 9))):
        sw = better(*(best.get((x, n, pop)) for x in SWAPS))
        inflight = None if not o["tpot_p50_ms"] else o["tokens_per_s"] * o["tpot_p50_ms"] / 1000
        vs_swap = None if system in SWAPS or not sw else o["tokens_per_s"] / sw["tokens_per_s"]
        vs_base = None if system == "base" or not base_best else o["tokens_per_s"] / base_best["tokens_per_s"]
        lines.append(f"| {system} | {n} | {pop} | {o['tokens_per_s']:.1f} | {o['rate']} | "
                     f"{fmt(o['tpot_p50_ms'], '.1f')} | {fmt(inflight, '.1f')} | "
                     f"{'-' if vs_swap is None else format(vs_swap, '.1f') + 'x'} | {fmt(vs_base, '.0%')} |")
    # Sustained capacity: each system's tokens/s at the highest rate it kept up with (`sustained`). An
    # overloaded system's tokens/s over a finite run grow with its backlog (swap serves more queued
    # requests of one model per swap-in), so this is the comparison that does not depend on run length.
    top = {}
    for o in out:
        key = (o["system"], o["n_models"], o["popularity"])
        if o["sustained"] and o["tokens_per_s"] is not None and (
                key not in top or float(o["rate"]) > float(top[key]["rate"])):
            top[key] = o
    if top:
        lines += ["", "## Sustained capacity (tokens/s at the highest rate each system kept up with)", "",
                  "| system | N | popularity | rate (req/s) | tokens/s | TTFT p99 (s) | vs swap |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for (system, n, pop), o in sorted(top.items(),
                                          key=lambda kv: (kv[0][1], kv[0][2], ORDER.get(kv[0][0], 9))):
            sw = better(*(top.get((x, n, pop)) for x in SWAPS))
            vs = None if system in SWAPS or not sw else o["tokens_per_s"] / sw["tokens_per_s"]
            lines.append(f"| {system} | {n} | {pop} | {o['rate']} | {o['tokens_per_s']:.1f} | "
                         f"{o['ttft_p99_s']:.3f} | {'-' if vs is None else format(vs, '.1f') + 'x'} |")
    for system in sorted({o["system"] for o in out if o["system"].startswith("dz-")}):
        for n in sorted({o["n_models"] for o in out if o["system"] == system}):
            s = [o for o in out if o["system"] == system and o["n_models"] == n
                 and o["popularity"] == "uniform" and o["sustained"]]
            if s:
                top = max(s, key=lambda o: float(o["rate"]))
                lines.append(f"\nHighest rate {system} sustains at N = {n} (uniform): {top['rate']} req/s, "
                             f"TTFT p99 {top['ttft_p99_s']:.3f} s.")
    with open(args.prefix + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot", file=sys.stderr)
        return
    panels = sorted({(o["n_models"], o["popularity"]) for o in out if o["system"] != "base"})
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(max(6.5, 4.5 * len(panels)), 3.8),
                             squeeze=False)
    for ax, (n, pop) in zip(axes[0], panels):
        for system in sorted({o["system"] for o in out}, key=lambda s: ORDER.get(s, 9)):
            pts = [o for o in out if o["system"] == system
                   and (system == "base" or (o["n_models"] == n and o["popularity"] == pop))]
            pts.sort(key=lambda o: float(o["rate"]))
            if pts:
                ax.plot([float(o["rate"]) for o in pts], [o["tokens_per_s"] for o in pts], "o-",
                        label=system)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"N = {n}, {pop}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"H200, 7B-shaped Llama: throughput vs rate ({meta.get('date', '')[:10]})")
    fig.tight_layout()
    fig.savefig(args.prefix + ".png", dpi=110)


if __name__ == "__main__":
    main()
