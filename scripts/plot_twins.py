#!/usr/bin/env python3
"""EM's margin over its twins (docs/results/twins.csv) as two pictures for docs/results.md:
the margin of CALM over each twin against the number of kernels K (digits and Fashion-MNIST,
variance 1), and against the fixed variance (the posterior's temperature; digits, K 128).

    python3 scripts/plot_twins.py [docs/results/twins.csv] [docs/results]

Needs matplotlib."""
import csv
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/twins.csv")
out = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "docs/results")
rows = list(csv.DictReader(line for line in src.open() if not line.startswith("#")))
TWINS = [("random", "N(0,1), whitened"), ("random_u", "N(0,1), unwhitened"),
         ("patches", "data patches"), ("kmeans", "k-means")]
COLOR = dict(zip([t for t, _ in TWINS], ["C0", "C1", "C2", "C3"]))


def margins(subset, key):
    xs, ys = [], {}
    for r in subset:
        xs.append(float(r[key]))
        for t, _ in TWINS:
            ys.setdefault(t, []).append(float(r["calm"]) - float(r[t]) if r[t] else None)
    return xs, ys


fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
for ax, data in zip(axes, ("digits", "fashion")):
    subset = [r for r in rows if r["data"] == data and r["variance"] == "1"]
    xs, ys = margins(subset, "kernels")
    for t, label in TWINS:
        pts = [(x, y) for x, y in zip(xs, ys[t]) if y is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label, color=COLOR[t])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("kernels K")
    ax.set_title(f"{data}: CALM minus twin (validation, points)")
axes[0].set_ylabel("margin (percentage points)")
axes[0].legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "twins-k.png", dpi=100)

fig, ax = plt.subplots(figsize=(5, 4))
subset = [r for r in rows if r["data"] == "digits" and r["kernels"] == "128"]
subset.sort(key=lambda r: float(r["variance"]))
xs, ys = margins(subset, "variance")
for t, label in TWINS:
    ax.plot(xs, ys[t], marker="o", label=label, color=COLOR[t])
ax.axhline(0, color="grey", lw=0.8)
ax.set_xscale("log", base=2)
ax.set_xlabel("fixed variance sigma^2 (--variance; SPEC: 1)")
ax.set_ylabel("margin (percentage points)")
ax.set_title("digits, K 128: CALM minus twin")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "twins-variance.png", dpi=100)
print(f"wrote {out / 'twins-k.png'} and {out / 'twins-variance.png'}")
