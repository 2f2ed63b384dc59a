"""Merges `deltazip bench quality` results (one JSON per fine-tune x recipe, or any number of them) into
one report: STEM.md (a table per fine-tune), STEM.json (a list of row objects) and STEM.png (gain kept vs
compression ratio, one line per method, one panel per fine-tune) and STEM-kl.png (KL to the fine-tune vs
ratio); plots are skipped without matplotlib.

    python3 bench/quality/report.py --results DIR_OR_FILES... [--finetunes FT_ROOT] --out STEM

Rows are keyed by (finetune, recipe, method): a row seen twice (the `finetune` reference row is in every
job's file) is kept once. With --finetunes, each FT_ROOT/<name>/finetune.json (bench/quality/finetune.py)
adds the fine-tune's training summary. Needs only the standard library (and matplotlib for the plot).
"""
import argparse, glob, json, os, sys

RECIPE_ORDER = ["finetune", "8b", "4b", "4b24", "2b", "2b24", "2b50", "sign"]


def recipe_key(r):
    if r in RECIPE_ORDER:
        return (RECIPE_ORDER.index(r), 0.0)
    if r.startswith("t"):
        try:
            return (len(RECIPE_ORDER), float(r[1:]))
        except ValueError:
            pass
    return (len(RECIPE_ORDER) + 1, 0.0)


def load(paths):
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(f for f in glob.glob(os.path.join(p, "*.json")) if not f.endswith(".tmp.json"))
        else:
            files.append(p)
    metas, rows = [], {}
    for f in files:
        with open(f) as fh:
            j = json.load(fh)
        if isinstance(j, list):  # an already merged quality.json
            for r in j:
                rows[(r["finetune"], r["recipe"], r.get("method", ""))] = r
            continue
        meta = {k: v for k, v in j.items() if k != "rows"}
        meta["job"] = os.path.splitext(os.path.basename(f))[0]  # device_run.sh names it FINETUNE-RECIPE.json
        metas.append(meta)
        for r in j.get("rows", []):
            r = dict(r)
            # Older binaries wrote compress_s; the report's field is `seconds`.
            if "seconds" not in r and "compress_s" in r:
                r["seconds"] = r.pop("compress_s")
            for k in ("device", "commit", "date", "samples", "seq_len", "eval_windows", "eval_seq_len"):
                r.setdefault(k, meta.get(k))
            rows[(r["finetune"], r["recipe"], r.get("method", ""))] = r
    out = sorted(rows.values(), key=lambda r: (r["finetune"], recipe_key(r["recipe"]), r.get("method", "")))
    return metas, out


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def jobs_line(metas, expected, jobs):
    """How many bench jobs finished. With `jobs` (the names device_run.sh asked for in this call, e.g.
    `gcide-t10`) the count is of those alone, and results left by earlier calls with other settings are
    counted apart (a results folder can hold both: the s3-budget report said "12 of 8")."""
    if jobs:
        have = {m.get("job") for m in metas}
        done = sum(1 for j in jobs if j in have)
        line = f"{done} of {len(jobs)} bench jobs (fine-tune x recipe) finished"
        extra = sorted(h for h in have if h not in set(jobs))
        if extra:
            line += f"; {len(extra)} more from earlier calls are included ({', '.join(extra)})"
        return line + "."
    if expected:
        return f"{min(len(metas), expected)} of {expected} bench jobs (fine-tune x recipe) finished."
    return None


def markdown(metas, rows, fts, expected, jobs=None):
    lines = ["## Quality of compressed fine-tunes (SmolLM2-135M-Instruct)", ""]
    keys = sorted({(m.get("commit"), m.get("device"), m.get("date"), json.dumps(m.get("machine"))) for m in metas})
    for c, d, date, mach in keys:
        lines.append(f"commit `{c}` | device `{d}` | {date} | machine {mach}")
    if metas:
        m = metas[0]
        lines.append("")
        lines.append(f"calibration {m.get('samples')} x {m.get('seq_len')} tokens of the fine-tune's training text "
                     f"| eval {m.get('eval_windows')} x {m.get('eval_seq_len')} held-out tokens per text")
    line = jobs_line(metas, expected, jobs)
    if line:
        lines.append("\n" + line)
    if fts:
        lines += ["", "### Fine-tunes", "",
                  "| fine-tune | text | steps | batch x seq | lr | train s | held-out ppl before -> after | drop |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, f in sorted(fts.items()):
            flag = "" if f.get("ok") else " (below target)"
            lines.append(f"| {name} | {os.path.basename(f['text'])} | {f['steps']} ({f['stop']}) | "
                         f"{f['batch']} x {f['seq_len']} | {f['lr']:g} | {f['train_seconds']:.0f} | "
                         f"{f['ppl_before']:.3f} -> {f['ppl_after']:.3f} | {100 * f['drop']:.1f}%{flag} |")
    lines += ["", "### Results", "",
              "| fine-tune | recipe | method | ratio | ppl domain | ppl general | gain kept | KL(ft‖c) | compress s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['finetune']} | {r['recipe']} | {r.get('method', '')} | error: "
                         f"{str(r['error']).replace('|', '/')} |||||| ")
            continue
        if r["recipe"] == "finetune":
            lines.append(f"| {r['finetune']} | *base* | | | {fmt(r.get('ppl_base_domain'), '.3f')} | "
                         f"{fmt(r.get('ppl_base_general'), '.3f')} | 0% | {fmt(r.get('kl_base'), '.2e')} | |")
        gk = r.get("gain_kept")
        lines.append(f"| {r['finetune']} | {r['recipe']} | {r.get('method', '')} | {fmt(r.get('ratio'), '.2f')}x | "
                     f"{fmt(r.get('ppl_domain'), '.3f')} | {fmt(r.get('ppl_general'), '.3f')} | "
                     f"{fmt(100 * gk if isinstance(gk, (int, float)) else None, '.1f')}% | {fmt(r.get('kl'), '.2e')} | "
                     f"{fmt(r.get('seconds'), '.0f')} |")
    return "\n".join(lines) + "\n"


def plot(rows, path, key="gain_kept", label="gain kept (%)", scale=100.0, log_y=False):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter, ScalarFormatter
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    names = sorted({r["finetune"] for r in rows})
    if not names:
        return
    cols = min(2, len(names))
    nrows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4.2 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        pts = [r for r in rows if r["finetune"] == name and r["recipe"] != "finetune" and "error" not in r
               and isinstance(r.get(key), (int, float)) and isinstance(r.get("ratio"), (int, float))]
        for method in sorted({r["method"] for r in pts}):
            p = sorted((r["ratio"], scale * r[key], r["recipe"]) for r in pts if r["method"] == method)
            ax.plot([x for x, _, _ in p], [y for _, y, _ in p], marker="o", label=method)
            for x, y, rec in p:
                ax.annotate(rec, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        if key == "gain_kept":
            ax.axhline(100, color="gray", lw=0.8, ls="--")
            ax.axhline(99, color="gray", lw=0.5, ls=":")
        ax.set_xscale("log")
        ax.set_xticks([2, 4, 8, 16, 32])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        if log_y:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("compression ratio vs bf16 fine-tune (x, whole model)")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", nargs="+", required=True)
    ap.add_argument("--finetunes", help="a folder of fine-tune dirs with finetune.json")
    ap.add_argument("--out", required=True, help="output stem: STEM.md, STEM.json, STEM.png")
    ap.add_argument("--expected", type=int, default=0, help="bench jobs expected (to say how many are missing)")
    ap.add_argument("--jobs", nargs="*", default=None,
                    help="the bench jobs expected, by result file stem (FINETUNE-RECIPE): counted by name")
    a = ap.parse_args()
    metas, rows = load(a.results)
    fts = {}
    if a.finetunes:
        for f in sorted(glob.glob(os.path.join(a.finetunes, "*", "finetune.json"))):
            with open(f) as fh:
                j = json.load(fh)
            fts[os.path.basename(os.path.dirname(f))] = {k: v for k, v in j.items() if k not in ("losses",)}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".md", "w") as fh:
        fh.write(markdown(metas, rows, fts, a.expected, a.jobs))
    with open(a.out + ".json", "w") as fh:
        json.dump(rows, fh, indent=1)
    if fts:
        with open(os.path.join(os.path.dirname(os.path.abspath(a.out)), "finetunes.json"), "w") as fh:
            json.dump(fts, fh, indent=1)
    print(f"wrote {a.out}.md and {a.out}.json: {len(rows)} rows")
    plot(rows, a.out + ".png")
    plot(rows, a.out + "-kl.png", key="kl", label="KL(fine-tune || compressed), nats/token", scale=1.0, log_y=True)


if __name__ == "__main__":
    main()
