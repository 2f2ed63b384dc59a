#!/usr/bin/env python3
"""Side-by-side table of a chain's alternated serving runs (issue #9's dz / base, one server at a time).

    python3 bench/gpu/ab_table.py CHAIN_DIR [CHAIN_DIR...]

A chain (bench/gpu/next_chain.sh) writes one serving.sh output folder per run, named SYSTEM + run index
(`base1`, `dz1`, `dzplans1`, `dzwide1`, `dz2b1`, ...: letters, digits inside, one digit last), each with
`serving.json` (one row per rate; other folders, such as `base64`, are left out). For
every system this prints each run's tokens/s and mid tokens/s (the throughput between the 10th and the
90th percentile of completions, `bench serve` since session 17; `-` in older runs), their means, and
the means as a fraction of the base's. Each row of a run's serving.json is one pass (a rate; since
session 20 a chain may run the same rate several times on one server): a cell lists the run's passes,
and the means are over every pass of every run.
"""
import glob
import json
import os
import re
import sys
from collections import defaultdict


def runs(chain):
    """{system: {index: [(tokens_per_s, mid_tokens_per_s or None) per pass]}} of the chain's run folders."""
    out = defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(chain, "*", "serving.json"))):
        name = os.path.basename(os.path.dirname(path))
        m = re.fullmatch(r"([a-z][a-z0-9]*[a-z]|[a-z])(\d)", name)
        if not m:
            continue
        rows = json.load(open(path))
        if not rows:
            continue
        # A pass without a completed request (a crashed server) has no throughput: None, left out.
        out[m.group(1)][int(m.group(2))] = [
            (r.get("tokens_per_s") or None, r.get("mid_tokens_per_s")) for r in rows
        ]
    return out


def mean(v):
    v = [x for x in v if x is not None]
    return sum(v) / len(v) if v else None


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def table(chain):
    r = runs(chain)
    if not r:
        return f"{chain}: no run folders with serving.json\n"
    width = max(max(v) for v in r.values())
    base = r.get("base", {})
    base_mean = mean([t for passes in base.values() for t, _ in passes])
    base_mid = mean([m for passes in base.values() for _, m in passes])
    head = " | ".join(f"run {i}" for i in range(1, width + 1))
    lines = [
        f"## {chain}",
        "",
        f"| system | {head} | mean | / base | mid mean | mid / base |",
        "|---|" + "---:|" * (width + 4),
    ]
    order = ["base"] + sorted(s for s in r if s != "base")
    for system in order:
        if system not in r:
            continue
        by = r[system]
        cells = [
            "-" if i not in by else " / ".join(f"{fmt(t)} ({fmt(m)})" for t, m in by[i])
            for i in range(1, width + 1)
        ]
        t = mean([v[0] for passes in by.values() for v in passes])
        m = mean([v[1] for passes in by.values() for v in passes])
        ratio = lambda a, b: None if a is None or not b else a / b
        lines.append(
            f"| {system} | {' | '.join(cells)} | {fmt(t)} | {fmt(ratio(t, base_mean), '.1%')} "
            f"| {fmt(m)} | {fmt(ratio(m, base_mid), '.1%')} |"
        )
    lines.append("")
    lines.append("Cells: tokens/s (mid tokens/s), one per pass; `-` a pass without a completed request.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for d in sys.argv[1:]:
        print(table(d))
