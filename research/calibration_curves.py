"""The coverage/precision curves behind `python -m sdk calibrate`'s back-off thresholds, as PNG figures.

    python research/calibration_curves.py --model DIR --data $G [--split val] [--limit N] [--out DIR]

For each level, coarsest first: the share of images answered down to that level (with the levels above at
their chosen thresholds) against the precision of those answers, as the threshold sweeps 0 … 1, with the
threshold `sdk calibrate` picks marked; and a histogram of the chosen out-of-catalogue score on the
calibration split and on the generated out-of-catalogue images. Needs matplotlib (not an SDK dependency).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def coverage_precision_curves(ds, thresholds: Sequence[float]) -> list[dict[str, Any]]:
    """Per level, the coverage and precision of the answers at every threshold of a grid (and at every
    marginal the set holds), the levels above at their `thresholds`."""
    ds = ds.labelled()
    probs, correct, n = ds.probs, ds.paths == ds.labels, len(ds.paths)
    curves = []
    reach = np.ones(n, bool)  # answered down to the level above
    for lvl, t in enumerate(thresholds):
        grid = np.unique(np.r_[np.linspace(0, 1, 201), probs[reach, lvl]])
        cov, prec = [], []
        for g in grid:
            ans = reach & (probs[:, lvl] >= g)
            cov.append(ans.sum() / max(n, 1))
            prec.append(correct[ans, lvl].mean() if ans.any() else np.nan)
        curves.append({"threshold": grid, "coverage": np.asarray(cov), "precision": np.asarray(prec), "chosen": t})
        reach = reach & (probs[:, lvl] >= t)
    return curves


def plot_curves(curves: list[dict[str, Any]], level_names: Sequence[str], target: float, out_dir: Path,
                in_scores: np.ndarray, ood_scores: np.ndarray, unknown_kind: str,
                unknown_threshold: float) -> list[Path]:
    """One coverage/precision PNG per level and a histogram of the unknown score."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)

    for name, c in zip(level_names, curves):
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot(c["coverage"], c["precision"], lw=1.5)
        i = int(np.argmin(np.abs(c["threshold"] - c["chosen"])))
        ax.plot([c["coverage"][i]], [c["precision"][i]], "o", color="C3",
                label=f"chosen t={c['chosen']:.3f}: coverage {c['coverage'][i]:.2f}, precision {c['precision'][i]:.3f}")
        ax.axhline(target, ls="--", color="grey", lw=1, label=f"target {target}")
        ax.set(xlabel=f"coverage (share of images answered to '{name}')", ylabel=f"precision at '{name}'",
               xlim=(0, 1.02))
        ax.set_title(f"back-off at level '{name}' (levels above at their thresholds)", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
        ax.grid(alpha=0.3)
        save(fig, f"calibration_{name}.png")
    fig, ax = plt.subplots(figsize=(5, 4))
    bins = np.linspace(0, 1, 41)
    ax.hist(in_scores, bins=bins, alpha=0.6, label="in-catalogue (calibration split)", density=True)
    ax.hist(ood_scores, bins=bins, alpha=0.6, label="generated out-of-catalogue", density=True)
    ax.axvline(unknown_threshold, color="C3", ls="--", label=f"threshold {unknown_threshold:.3f}")
    ax.set_xlabel(f"unknown score ({unknown_kind})")
    ax.legend(fontsize=7)
    save(fig, "unknown_score.png")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory (artifact + manifest.json)")
    p.add_argument("--data", required=True, help="dataset root (Grocery Store root or folder tree)")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=0, help="at most N images of the split (evenly spaced)")
    p.add_argument("--target-precision", type=float, default=0.98)
    p.add_argument("--max-false-unknown", type=float, default=0.05)
    p.add_argument("--ood-per-kind", type=int, default=16)
    p.add_argument("--out", default=None, help="where the PNGs go (default: MODEL/calibration)")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("no plots: pip install matplotlib", file=sys.stderr)
        return 2

    from sdk import Classifier, load_dataset
    from sdk import _calibrate as C

    clf = Classifier.load(args.model)
    ds = load_dataset(args.data, args.split, taxonomy=clf.taxonomy)
    if args.limit and len(ds) > args.limit:
        ds = ds.subset(np.linspace(0, len(ds) - 1, args.limit).round().astype(int).tolist())
    ood = C.out_of_catalogue_images(args.ood_per_kind)
    in_lp = C.batch_logprobs(clf, [s.source for s in ds.samples])
    ood_lp = C.batch_logprobs(clf, [img for _, img in ood])
    cal = C.calibrate(clf, in_lp, ds.labels(), ood_lp, [k for k, _ in ood], args.target_precision,
                      args.max_false_unknown)
    decoded, ood_decoded = C.decode_set(clf.taxonomy, in_lp, ds.labels()), C.decode_set(clf.taxonomy, ood_lp)
    kind = cal.unknown_score
    plots = plot_curves(coverage_precision_curves(decoded, cal.thresholds), clf.taxonomy.level_names,
                        args.target_precision, Path(args.out) if args.out else clf.directory / "calibration",
                        decoded.unknown[kind], ood_decoded.unknown[kind], kind, cal.unknown_threshold)
    print("wrote " + ", ".join(str(p) for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
