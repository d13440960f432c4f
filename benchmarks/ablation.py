"""Teacher ablation on Grocery: same backbone (Lite2), same frozen cache, same budget for every row.

    python benchmarks/ablation.py --data ../shared/datasets/grocery-store --out runs/ablation --epochs 8 \
        --cache-views 8 --ema 0.99 --mixup 0.2 --dropout 0.3

Rows: flat classifier (fine head only, coarse by the tree), HRN head + tree loss, HSQ-FT without
CAMP, HSQ-FT full, HSQ-FT + seed extras, and HSQ-FT with 50 % of fine labels moved to the coarse
level (HRN relabelling). Every run holds out the same stratified 20 % of `train` (written to
holdout.txt) and reports on `val` and on that slice. Results: <out>/ablation.json and ablation.md.
Runs already finished under <out>/<row> are reused (delete a folder to rerun it).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.__main__ import TEACHER_DEFAULTS, TEACHER_TRAIN  # noqa: E402
from train.loop import TrainConfig, train_model  # noqa: E402
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-views", type=int, default=TrainConfig.cache_views)
    p.add_argument("--ema", type=float, default=0.0, help="weight average decay for every row (0 = off)")
    p.add_argument("--mixup", type=float, default=0.0, help="feature mixup alpha for every row (0 = off)")
    p.add_argument("--dropout", type=float, default=TEACHER_DEFAULTS.dropout, help="head dropout for every row")
    a = p.parse_args(argv)
    out = Path(a.out)
    results = {}
    for row in a.rows.split(","):
        mkw, tkw = ROWS[row]
        mc = ModelConfig.from_dict({**TEACHER_DEFAULTS.to_dict(), "dropout": a.dropout, **mkw})
        tc = TrainConfig.from_dict({**TEACHER_TRAIN, "data": a.data, "epochs": a.epochs, "threads": a.threads,
                                    "cache_views": a.cache_views, "ema": a.ema, "mixup": a.mixup, **tkw})
        d = out / row
        if not (d / "metrics.json").is_file():
            print(f"== {row}", flush=True)
            train_model(mc, tc, d)
        conf = json.loads((d / "config.json").read_text())
        results[row] = {"metrics": conf["metrics"], "params": count_params(d),
                        "train_seconds": conf.get("wall_seconds"), "model": mkw, "train": tkw}
    (out / "ablation.json").write_text(json.dumps(results, indent=1))
    lines = ["| row | split | category | coarse | fine | full path | consistency | mistake severity | params (M) | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row, r in results.items():
        for split, m in r["metrics"].items():
            lines.append(f"| {row} | {split} | {m['top1/category']:.3f} | {m['top1/coarse']:.3f} | {m['top1/fine']:.3f} | "
                         f"{m['full_path']:.3f} | {m['consistency']:.3f} | {m['mistake_severity']:.3f} | "
                         f"{r['params'] / 1e6:.2f} | {r['train_seconds']:.0f} |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'ablation.json'} and {out / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
