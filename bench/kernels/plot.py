"""Plot of the kernel benchmark: speedup of dz `delta_matmul` over cuBLAS bf16 against input rows, one panel
per weight shape, one line per codec (and the byte ratio each would reach at full bandwidth, dotted).

    python3 bench/kernels/plot.py bench/results/kernels-h200.json bench/results/kernels-h200.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    doc = json.load(open(src))
    rows = [r for r in doc["results"] if r["op"] == "delta_matmul" and r["path"] == "dz"]
    shapes = []
    for r in rows:
        s = (r["n"], r["k"])
        if s not in shapes:
            shapes.append(s)
    cols = 3
    lines = (len(shapes) + cols - 1) // cols
    fig, axes = plt.subplots(lines, cols, figsize=(5 * cols, 3.6 * lines), squeeze=False)
    for ax, (n, k) in zip(axes.flat, shapes):
        codecs = []
        for r in rows:
            if (r["n"], r["k"]) == (n, k) and r["codec"] not in codecs:
                codecs.append(r["codec"])
        for i, c in enumerate(codecs):
            pts = sorted((r["rows"], r["speedup_vs_cublas"], r["byte_ratio"]) for r in rows
                         if (r["n"], r["k"]) == (n, k) and r["codec"] == c)
            color = f"C{i}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=c, ms=3)
            ax.plot([p[0] for p in pts], [p[2] for p in pts], ":", color=color, lw=1)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(f"{n} x {k}")
        ax.set_xlabel("rows (batch)")
        ax.set_ylabel("speedup vs cuBLAS bf16")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"deltazip delta_matmul vs cuBLAS bf16 on {doc['gpu']} ({doc['date']}, {doc['commit']}); "
                 "dotted: byte ratio", fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
