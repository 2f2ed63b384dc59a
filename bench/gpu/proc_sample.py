#!/usr/bin/env python3
"""Samples a process's threads and the machine's CPUs from /proc, for the serving chains (session 20).

    python3 bench/gpu/proc_sample.py PID OUT.jsonl [INTERVAL_S]     (until PID exits or it is killed)
    python3 bench/gpu/proc_sample.py --report OUT.jsonl SERVE_LOG [--from UNIX_S --to UNIX_S]
    python3 bench/gpu/proc_sample.py --phases SERVE_LOG

The device machine has no perf, gdb or strace, and cuda-gdb's attach stopped the server for 20 s or
crashed it (session 20). /proc costs nothing to read. Each line of OUT.jsonl is one sample:
`{"t": unix seconds, "th": {tid: [name, utime, stime, minflt, majflt, cpu, voluntary, involuntary]},
"cpu": [[user, system, idle, steal] per CPU]}` (ticks, faults and context switches are cumulative;
`cpu` is the CPU the thread last ran on).

--report takes the busiest thread (the engine's, in a serving run) and prints, per second: its CPU
and system share, minor faults, context switches and the CPUs it ran on, the steal time of those CPUs,
and, from SERVE_LOG's `dz-tp-phases` lines (host seam 16, `DZ_TP_TRACE=1`), the steps that ended in that
second: how many, their median time and their phases. A slow second next to a fast one then says
whether the engine thread was descheduled (involuntary switches, steal), faulting (minor faults, system
time), or moved to another CPU.

--phases needs only SERVE_LOG: the decode steps of the largest batch (`dz-tp-trace` lines with no prompt
and the most decoded sequences), their fastest and slowest thirds, and each third's median step and
phases: which phase makes a slow step slow.
"""
import json
import os
import re
import statistics
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def thread_row(task):
    with open(f"{task}/stat") as f:
        stat = f.read()
    # The name is in parentheses and may hold spaces: split after its closing one.
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    f = stat[stat.rindex(")") + 2:].split()
    # Fields from 3 (state): minflt 10, majflt 12, utime 14, stime 15, processor 39 (1-based).
    minflt, majflt, utime, stime, cpu = int(f[7]), int(f[9]), int(f[11]), int(f[12]), int(f[36])
    vol = invol = 0
    with open(f"{task}/status") as s:
        for line in s:
            if line.startswith("voluntary_ctxt_switches"):
                vol = int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                invol = int(line.split()[1])
    return [name, utime, stime, minflt, majflt, cpu, vol, invol]


def cpus():
    out = []
    with open("/proc/stat") as f:
        for line in f:
            if re.match(r"cpu\d+ ", line):
                v = [int(x) for x in line.split()[1:]]
                out.append([v[0] + v[1], v[2] + v[5] + v[6], v[3] + v[4], v[7]])
    return out


def sample(pid, out_path, interval):
    with open(out_path, "a") as out:
        while os.path.exists(f"/proc/{pid}"):
            t = time.time()
            threads = {}
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    try:
                        threads[tid] = thread_row(f"/proc/{pid}/task/{tid}")
                    except (OSError, ValueError, IndexError):
                        pass
            except OSError:
                break
            out.write(json.dumps({"t": round(t, 3), "th": threads, "cpu": cpus()}) + "\n")
            out.flush()
            time.sleep(max(0.0, interval - (time.time() - t)))


def trace_lines(path):
    """(kind, {field: value}) of each `dz-tp-trace` and `dz-tp-phases` line of a server's log."""
    for line in open(path, errors="replace"):
        kind = line.split(" ", 1)[0]
        if kind in ("dz-tp-trace", "dz-tp-phases"):
            yield kind, {k: float(v) for k, v in (kv.split("=", 1) for kv in line.split()[1:])}


def decode_phases(serve_log):
    """The --phases table (see the module docs)."""
    trace, phases = {}, {}
    for kind, d in trace_lines(serve_log):
        (trace if kind == "dz-tp-trace" else phases)[(d["rank"], d["step"])] = d
    decode = [(t, phases[k]) for k, t in trace.items() if k in phases and t["prompt"] == 0 and t["decode"] > 0]
    if not decode:
        return f"{serve_log}: no decode steps with phases (DZ_TP_TRACE=1 and host patch 0016?)"
    rows = max(t["decode"] for t, _ in decode)
    steps = sorted((p for t, p in decode if t["decode"] == rows), key=lambda p: p["sched_ms"] + p["inputs_ms"]
                   + p["fwd_ms"] + p["logits_ms"] + p["sample_ms"] + p["other_ms"])
    names = ["sched_ms", "inputs_ms", "fwd_ms", "logits_ms", "sample_ms", "other_ms"]
    third = max(1, len(steps) // 3)
    lines = [f"{serve_log}: {len(steps)} decode steps of {rows:.0f} sequences", "",
             "| steps | n | step ms | " + " | ".join(n[:-3] for n in names) + " |", "|---|" + "---:|" * (2 + len(names))]
    for label, part in (("fastest third", steps[:third]), ("middle", steps[third:-third] or steps),
                        ("slowest third", steps[-third:])):
        total = statistics.median(sum(p[n] for n in names) for p in part)
        cells = [f"{statistics.median(p[n] for p in part):.2f}" for n in names]
        lines.append(f"| {label} | {len(part)} | {total:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def steps_from_log(path):
    return [d for kind, d in trace_lines(path) if kind == "dz-tp-phases"]


def report(jsonl, serve_log, t_from=None, t_to=None):
    samples = [json.loads(line) for line in open(jsonl)]
    if len(samples) < 2:
        return "fewer than two samples"
    first, last = samples[0]["th"], samples[-1]["th"]
    busiest = max(last, key=lambda tid: sum(last[tid][1:3]) - sum(first.get(tid, [0, 0, 0])[1:3]))
    steps = steps_from_log(serve_log) if serve_log else []
    phases = ["sched_ms", "inputs_ms", "fwd_ms", "logits_ms", "sample_ms", "other_ms"]
    lines = [f"engine thread (busiest): {busiest} {last[busiest][0]}", "",
             "| t (s) | cpu % | sys % | minflt | inv cs | vol cs | cpus | steal % | steps | step ms | "
             + " | ".join(p[:-3] for p in phases) + " |",
             "|" + "---:|" * (10 + len(phases))]
    t0 = samples[0]["t"]
    for a, b in zip(samples, samples[1:]):
        if t_from and b["t"] < t_from or t_to and a["t"] > t_to:
            continue
        ta, tb = a["th"].get(busiest), b["th"].get(busiest)
        if not ta or not tb:
            continue
        dt = b["t"] - a["t"]
        cpu = 100 * (tb[1] + tb[2] - ta[1] - ta[2]) / TICK / dt
        sys_ = 100 * (tb[2] - ta[2]) / TICK / dt
        ran = sorted({ta[5], tb[5]})
        steal = []
        for c in ran:
            if c < len(a["cpu"]) and c < len(b["cpu"]):
                total = sum(b["cpu"][c]) - sum(a["cpu"][c])
                steal.append(100 * (b["cpu"][c][3] - a["cpu"][c][3]) / total if total else 0.0)
        in_bin = [s for s in steps if a["t"] < s.get("unix_s", 0) <= b["t"]]
        ms = [sum(s.get(p, 0) for p in phases) for s in in_bin]
        cells = [f"{b['t'] - t0:.1f}", f"{cpu:.0f}", f"{sys_:.0f}", str(tb[3] - ta[3]), str(tb[7] - ta[7]),
                 str(tb[6] - ta[6]), ",".join(map(str, ran)), ",".join(f"{x:.0f}" for x in steal), str(len(in_bin)),
                 f"{statistics.median(ms):.1f}" if ms else ""]
        cells += [f"{statistics.mean(s.get(p, 0) for s in in_bin):.1f}" if in_bin else "" for p in phases]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) == 2 and argv[0] == "--phases":
        print(decode_phases(argv[1]))
    elif len(argv) >= 2 and argv[0] == "--report":
        opts = {"--from": None, "--to": None}
        rest = []
        it = iter(argv[1:])
        for a in it:
            if a in opts:
                opts[a] = float(next(it))
            else:
                rest.append(a)
        print(report(rest[0], rest[1] if len(rest) > 1 else None, opts["--from"], opts["--to"]))
    elif len(argv) >= 2:
        sample(argv[0], argv[1], float(argv[2]) if len(argv) > 2 else 1.0)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
