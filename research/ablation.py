"""Teacher ablation on Grocery: same backbone (Lite2), same frozen cache, same budget for every row.

    python research/ablation.py --data ../shared/datasets/grocery-store --out runs/ablation --epochs 8 \
        --cache-views 8 --ema 0.99 --mixup 0.2 --dropout 0.3

Rows: flat classifier (fine head only, coarse by the tree), HRN head + tree loss, HSQ-FT without
CAMP, HSQ-FT full, HSQ-FT + seed extras, and HSQ-FT with 50 % of fine labels moved to the coarse
level (HRN relabelling). Every run holds out the same stratified 20 % of `train` (written to
holdout.txt) and reports on `val` and on that slice. Results: <out>/ablation.json and ablation.md, with the
differences the teacher design claims rest on (HSQ-FT vs flat, CAMP vs none, relabelling, extras) per split.
Runs already finished under <out>/<row> are reused (delete a folder to rerun it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.__main__ import TEACHER_DEFAULTS, TEACHER_TRAIN  # noqa: E402
from train.loop import TrainConfig, train_model  # noqa: E402
from research.output import write_results  # noqa: E402
from train.models import ModelConfig  # noqa: E402

ROWS: dict[str, tuple[dict, dict]] = {
    "flat": ({"arch": "flat"}, {"losses": "fine_ce", "loss_weights": ""}),
    "hrn": ({"arch": "hrn"}, {"losses": "tree,fine_ce", "loss_weights": ""}),
    "hsq_no_camp": ({"camp": False}, {}),
    "hsq_full": ({}, {}),
    "hsq_extras": ({"part_select": 16}, {"losses": "ce,cluster,contrastive", "loss_weights": "cluster=0.1,contrastive=0.5"}),
    "hsq_relabel0.5": ({}, {"relabel_ratio": 0.5, "losses": "ce,cluster,tree", "loss_weights": "cluster=0.1"}),
}


def count_params(model_dir: Path) -> int:
    """Parameters (BatchNorm running statistics excluded)."""
    from safetensors.torch import load_file
    return sum(v.numel() for k, v in load_file(str(model_dir / "model.safetensors")).items()
               if "running_" not in k and "num_batches" not in k)


# (label, row, against, metric, lower is better): the claims of the teacher design the table settles
COMPARISONS = (
    ("HSQ-FT full vs flat: fine top-1", "hsq_full", "flat", "top1/fine", False),
    ("HSQ-FT full vs flat: mistake severity", "hsq_full", "flat", "mistake_severity", True),
    ("CAMP (full vs without): consistency", "hsq_full", "hsq_no_camp", "consistency", False),
    ("CAMP (full vs without): mistake severity", "hsq_full", "hsq_no_camp", "mistake_severity", True),
    ("CAMP (full vs without): fine top-1", "hsq_full", "hsq_no_camp", "top1/fine", False),
    ("HRN head vs flat: mistake severity", "hrn", "flat", "mistake_severity", True),
    ("seed extras vs full: fine top-1", "hsq_extras", "hsq_full", "top1/fine", False),
    ("relabel 0.5 vs 0.0: fine top-1", "hsq_relabel0.5", "hsq_full", "top1/fine", False),
    ("relabel 0.5 vs 0.0: coarse top-1", "hsq_relabel0.5", "hsq_full", "top1/coarse", False),
)


def summarize(out: Path, rows: list[str]) -> tuple[dict, str]:
    """Collect finished rows from <out>/<row>/config.json; the table plus the comparisons between rows."""
    results = {}
    for row in rows:
        d = out / row
        conf = json.loads((d / "config.json").read_text())
        results[row] = {"metrics": conf["metrics"], "params": count_params(d),
                        "train_seconds": conf.get("wall_seconds"), "model": ROWS[row][0], "train": ROWS[row][1]}
    lines = ["| row | split | category | coarse | fine | full path | consistency | mistake severity | params (M) | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row, r in results.items():
        for split, m in r["metrics"].items():
            secs = "–" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
            lines.append(f"| {row} | {split} | {m['top1/category']:.3f} | {m['top1/coarse']:.3f} | {m['top1/fine']:.3f} | "
                         f"{m['full_path']:.3f} | {m['consistency']:.3f} | {m['mistake_severity']:.3f} | "
                         f"{r['params'] / 1e6:.2f} | {secs} |")
    comparisons = []
    for label, a, b, metric, lower in COMPARISONS:
        if a not in results or b not in results:
            continue
        for split in results[a]["metrics"]:
            if split not in results[b]["metrics"]:
                continue
            delta = results[a]["metrics"][split][metric] - results[b]["metrics"][split][metric]
            comparisons.append({"comparison": label, "split": split, "metric": metric, "delta": delta,
                                "better": (delta < 0) if lower else (delta > 0), "tie": delta == 0})
    if comparisons:
        lines += ["", "| comparison | split | difference | verdict |", "|---|---|---|---|"]
        for c in comparisons:
            verdict = "equal" if c["tie"] else ("better" if c["better"] else "worse")
            lines.append(f"| {c['comparison']} | {c['split']} | {c['delta']:+.3f} | {verdict} |")
    return {"rows": results, "comparisons": comparisons}, "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, any of {', '.join(ROWS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-views", type=int, default=TrainConfig.cache_views)
    p.add_argument("--ema", type=float, default=0.0, help="weight average decay for every row (0 = off)")
    p.add_argument("--mixup", type=float, default=0.0, help="feature mixup alpha for every row (0 = off)")
    p.add_argument("--dropout", type=float, default=TEACHER_DEFAULTS.dropout, help="head dropout for every row")
    a = p.parse_args(argv)
    rows = [r for r in a.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        p.error(f"unknown row(s) {unknown}; choose from {', '.join(ROWS)}")
    out = Path(a.out)
    for row in rows:
        mkw, tkw = ROWS[row]
        d = out / row
        if not (d / "metrics.json").is_file():
            mc = ModelConfig.from_dict({**TEACHER_DEFAULTS.to_dict(), "dropout": a.dropout, **mkw})
            tc = TrainConfig.from_dict({**TEACHER_TRAIN, "data": a.data, "epochs": a.epochs, "threads": a.threads,
                                        "cache_views": a.cache_views, "ema": a.ema, "mixup": a.mixup, **tkw})
            print(f"== {row}", flush=True)
            train_model(mc, tc, d)
    results, md = summarize(out, rows)
    return write_results(out, "ablation", results, md)


if __name__ == "__main__":
    sys.exit(main())
