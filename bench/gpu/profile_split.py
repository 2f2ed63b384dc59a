#!/usr/bin/env python3
"""Per-step split of a serving run's `DZ_PROFILE` counters (issue #9's "what bounds it").

    python3 bench/gpu/profile_split.py RUN_DIR...

Each RUN_DIR is a serving.sh output folder holding a `metrics-*.txt` scraped after the run with
DZ_PROFILE=1, host or events. Prints, per folder, the step interval and each profiled part's time per
step (ms) and per call (us), then what the parts leave for the rest of the step (the host engine's
attention, sampling and scheduling). A base served alone is profiled too (session 16): its delta parts are 0.
With DZ_TRACE=1 as well (session 17), a second table gives each traced CPU phase of the hook and the ops
per step and per span (phases nest). A `warm-metrics-*.txt` beside it (the counters after the warm-up,
scraped by serving.sh since session 17) is subtracted, so the split covers the measured requests only.
"""
import glob
import os
import re
import sys

PARTS = [
    ("base_linear", "base linear, decode"),
    ("linear_delta", "linear delta, decode"),
    ("base_linear_prefill", "base linear, prefill"),
    ("linear_delta_prefill", "linear delta, prefill"),
    ("norm_delta", "norm delta"),
    ("embedding_delta", "embedding delta"),
    ("row_lookup", "row lookup"),
    ("head_wait", "GPU backlog at the head (wait mode)"),
]


def read(path):
    vals = {}
    for line in open(path):
        m = re.match(r'^(deltazip_(?:profile|trace)_\w+)(\{(?:part|phase)="([^"]+)"\})?\s+([0-9.eE+-]+)$', line.strip())
        if m:
            vals[(m.group(1), m.group(3))] = float(m.group(4))
    return vals


def split(folder):
    files = sorted(glob.glob(os.path.join(folder, "metrics-*.txt")))
    if not files:
        return f"{folder}: no metrics-*.txt"
    v = read(files[-1])
    # serving.sh (session 17) scrapes the counters after a profiled server's warm-up too: subtract them.
    warm = sorted(glob.glob(os.path.join(folder, "warm-metrics-*.txt")))
    if warm:
        w = read(warm[-1])
        v = {k: x - w.get(k, 0.0) for k, x in v.items()}
    steps = v.get(("deltazip_profile_steps_total", None), 0.0)
    step_s = v.get(("deltazip_profile_step_seconds_total", None), 0.0)
    if steps == 0:
        return f"{folder}: no profiled steps (was DZ_PROFILE set?)"
    out = [f"## {folder} ({int(steps)} steps)", "", "| part | ms a step | us a call |", "|---|---:|---:|"]
    out.append(f"| step | {1e3 * step_s / steps:.1f} | |")
    total = 0.0
    for key, label in PARTS:
        s = v.get(("deltazip_profile_seconds_total", key), 0.0)
        c = v.get(("deltazip_profile_calls_total", key), 0.0)
        total += s
        per_call = f"{1e6 * s / c:.1f}" if c else ""
        out.append(f"| {label} | {1e3 * s / steps:.1f} | {per_call} |")
    out.append(f"| rest of the step | {1e3 * (step_s - total) / steps:.1f} | |")
    # Since session 20: the forward pass's span (first profiled part to the end of the output head) splits
    # the rest into what the host runs inside the pass (attention, activations, norms, launches) and
    # between passes (sampling, responses, scheduling, the next pass's inputs).
    passes = v.get(("deltazip_profile_passes_total", None), 0.0)
    pass_s = v.get(("deltazip_profile_pass_seconds_total", None), 0.0)
    if passes:
        per_pass = 1e3 * pass_s / passes
        in_parts = 1e3 * (total - v.get(("deltazip_profile_seconds_total", "head_wait"), 0.0)) / steps
        head = 1e3 * v.get(("deltazip_profile_seconds_total", "head_wait"), 0.0) / steps
        out.append(f"| - inside the pass (its span {per_pass:.1f} less the parts) | {per_pass - in_parts - head:.1f} | |")
        out.append(f"| - between passes (the step less the span) | {1e3 * step_s / steps - per_pass:.1f} | |")
    phases = sorted(
        ((k[1], s) for k, s in v.items() if k[0] == "deltazip_trace_seconds_total"),
        key=lambda p: -p[1],
    )
    if phases:
        out += ["", "| traced phase (DZ_TRACE=1) | ms a step | spans a step | us a span |", "|---|---:|---:|---:|"]
        for name, s in phases:
            n = v.get(("deltazip_trace_spans_total", name), 0.0)
            per_span = f"{1e6 * s / n:.1f}" if n else ""
            out.append(f"| {name} | {1e3 * s / steps:.2f} | {n / steps:.1f} | {per_span} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for d in sys.argv[1:]:
        print(split(d))
