"""The benchmark's figures: accuracy vs latency with its Pareto front, and for the focus rows the confused
pairs and reliability per level and the back-off coverage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .measure import Row, slug
from .stats import pareto

MARKERS = {"onnx": "o", "tflite": "s", "executorch": "^", "pytorch": "D", "coreml": "x"}


def _save(plt, fig, path: Path, dpi: int) -> Path:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _accuracy_vs_latency(plt, measured: list[Row], fine: str, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(11, 5.5))
    fig.subplots_adjust(left=0.08, right=0.66, bottom=0.11, top=0.92)
    pts = [(r.record["latency"]["median_ms"], r.record["metrics"][f"top1/{fine}"]) for r in measured]
    groups = sorted({r.entry.group for r in measured})
    for k, (r, (x, y)) in enumerate(zip(measured, pts), 1):
        c = f"C{groups.index(r.entry.group) % 10}"
        ax.scatter([x], [y], marker=MARKERS.get(r.entry.target, "o"), s=60, color=c,
                   facecolors=c if r.entry.precision == "int8" else "none", linewidths=1.5)
        # numbers on the points, names in the key beside the axes: clustered rows stay readable
        ax.annotate(str(k), (x, y), fontsize=7, xytext=(4, 3 + 7 * (k % 3)), textcoords="offset points")
    front = pareto(pts)
    if front:
        fx, fy = zip(*[pts[i] for i in front])
        ax.step(fx, fy, where="post", color="k", lw=1, ls="--", label="Pareto frontier")
        ax.scatter(fx, fy, s=180, facecolors="none", edgecolors="k", lw=1)
    ax.set(xscale="log", xlabel="median ms / image, batch 1, 1 thread (log)",
           ylabel=f"top-1 at '{fine}' (tree-consistent path)")
    ax.set_title("accuracy vs latency (filled = int8, hollow = fp32; marker = runtime)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    key = "\n".join(f"{k:>2}  {r.entry.label}: {x:.2f} ms, {y:.3f}" for k, (r, (x, y)) in enumerate(zip(measured, pts), 1))
    fig.text(0.68, 0.92, key, fontsize=7, va="top", family="monospace")
    return _save(plt, fig, out / "accuracy_vs_latency.png", 120)


def _confusions(plt, label: str, a: dict[str, Any], taxonomy, out: Path) -> Path:
    fig, axes = plt.subplots(1, taxonomy.depth, figsize=(5.5 * taxonomy.depth, 4.2))
    for ax, level in zip(np.atleast_1d(axes), taxonomy.level_names):
        pairs = a["confused"][level]
        ax.barh([f"{q['true']} → {q['predicted']}" for q in pairs][::-1], [q["count"] for q in pairs][::-1], color="C3")
        ax.set_title(f"'{level}': top {len(pairs)} confusions", fontsize=9)
        ax.set_xlabel("images")
        ax.tick_params(axis="y", labelsize=7)
        if not pairs:
            ax.text(0.5, 0.5, "no mistakes", ha="center", transform=ax.transAxes)
    fig.suptitle(f"{label}: most-confused pairs (true → predicted)", fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, out / f"confusion_{slug(label)}.png", 110)


def _reliability(plt, label: str, a: dict[str, Any], taxonomy, out: Path) -> Path:
    fig, axes = plt.subplots(1, taxonomy.depth, figsize=(4.2 * taxonomy.depth, 4.2))
    for ax, level in zip(np.atleast_1d(axes), taxonomy.level_names):
        rel = a["reliability"][level]
        e = np.asarray(rel["edges"])
        centers = (e[:-1] + e[1:]) / 2
        ax.bar(centers, np.nan_to_num(np.asarray(rel["accuracy"], float)), width=(e[1] - e[0]) * 0.95, color="C0",
               alpha=0.8, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        for x, n in zip(centers, rel["count"]):
            if n:
                ax.text(x, 0.02, str(n), ha="center", fontsize=6, color="k")
        ax.set_title(f"'{level}' (ECE {rel['ece']:.3f})", fontsize=9)
        ax.set(xlabel="marginal of the predicted node", xlim=(0, 1), ylim=(0, 1))
    np.atleast_1d(axes)[0].set_ylabel("accuracy")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{label}: reliability of the tree-consistent marginals", fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, out / f"reliability_{slug(label)}.png", 110)


def _coverage(plt, focus: list[Row], analyses: dict[str, dict[str, Any]], fine: str, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, r in enumerate(focus):
        cov = analyses[r.entry.label]["coverage"]
        for ax, mode in zip(axes, ("fine", "backoff")):
            ax.plot(cov[mode]["coverage"], cov[mode]["precision"], color=f"C{i % 10}", label=r.entry.label)
    axes[0].set_title(f"one threshold on the '{fine}' marginal (answer or abstain)", fontsize=9)
    axes[0].set_xlabel("coverage (share of images answered)")
    axes[1].set_title("one threshold on every level's marginal (back-off)", fontsize=9)
    axes[1].set_xlabel("coverage (answered nodes / all nodes)")
    for ax in axes:
        ax.set(ylabel="precision", xlim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return _save(plt, fig, out / "coverage_precision.png", 120)


def plot_all(rows: list[Row], analyses: dict[str, dict[str, Any]], taxonomy, out: Path) -> list[Path]:
    """Every figure of a run, written into `out` as PNG; the paths in the order benchmark.md shows them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fine = taxonomy.level_names[-1]
    measured = [r for r in rows if r.record.get("status") == "ok"]
    focus = [r for r in measured if r.entry.label in analyses]
    written = [_accuracy_vs_latency(plt, measured, fine, out)]
    for r in focus:
        written += [_confusions(plt, r.entry.label, analyses[r.entry.label], taxonomy, out),
                    _reliability(plt, r.entry.label, analyses[r.entry.label], taxonomy, out)]
    return written + [_coverage(plt, focus, analyses, fine, out)]
