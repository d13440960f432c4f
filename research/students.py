"""Teacher, distilled students and no-teacher controls side by side: the distillation table and size ladder.

    python research/students.py teacher=runs/teacher distilled=runs/distill control=runs/student \
        distilled-160=runs/distill-160 control-160=runs/student-160 --out runs/students

For each model directory written by `python -m train` (teacher, student or distill): resolution,
parameters, MACs of one image through the deployed graph (`research.benchmark_figures.count_macs`: the
uint8-in / log-probs-out graph every exporter converts), fp32 size of `model.safetensors`, and the
metrics the run measured at its end on every evaluated split (`val` and the held-out `holdout`
slice), plus the teacher a distilled run learned from and the run's wall time. Nothing is retrained
or re-evaluated here: the figures are the ones in each run's `config.json`, so the table is exactly
reproducible from the runs. Writes <out>/students.md and <out>/students.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from research.benchmark_figures import count_macs  # noqa: E402
from research.output import write_results  # noqa: E402
from sdk import Taxonomy  # noqa: E402

COLUMNS = ("top1/category", "top1/coarse", "top1/fine", "full_path", "consistency", "mistake_severity")


def describe(model_dir: str | Path) -> dict[str, Any]:
    """One row: sizes and cost of the model in `model_dir` and the metrics its run recorded."""
    from safetensors import safe_open

    d = Path(model_dir)
    conf = json.loads((d / "config.json").read_text())
    if "metrics" not in conf:
        raise SystemExit(f"{d}: the run has not finished (config.json holds no final metrics)")
    tax = Taxonomy.load(d / "taxonomy.json")
    params = 0
    with safe_open(str(d / "model.safetensors"), "np") as f:
        for k in f.keys():
            if "running_" not in k and "num_batches" not in k:  # BatchNorm statistics are not parameters
                params += math.prod(f.get_slice(k).get_shape())
    distill = json.loads((d / "distill.json").read_text()) if (d / "distill.json").is_file() else {}
    return {
        "dir": str(d),
        "arch": conf["model"]["arch"],
        "backbone": conf["model"]["backbone"],
        "image_size": conf["model"]["image_size"],
        "params": params,
        "macs": count_macs(conf["model"], tax),
        "fp32_bytes": (d / "model.safetensors").stat().st_size,
        "teacher": distill.get("teacher"),
        "teacher_sha256": distill.get("teacher_sha256"),
        "wall_seconds": conf.get("wall_seconds"),
        "metrics": conf["metrics"],
    }


def table(rows: dict[str, dict[str, Any]]) -> str:
    splits = sorted({s for r in rows.values() for s in r["metrics"]}, key=lambda s: (s != "val", s))
    head = ["model", "px", "params (M)", "MACs (M)", "fp32 MB"]
    for s in splits:
        head += [f"{s} {c.split('/')[-1].replace('_', ' ')}" for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [f"{name} (`{r['dir']}`)", str(r["image_size"]), f"{r['params'] / 1e6:.2f}",
                 f"{r['macs'] / 1e6:.0f}", f"{r['fp32_bytes'] / 1e6:.1f}"]
        for s in splits:
            m = r["metrics"].get(s)
            cells += [("–" if m is None else f"{m[c]:.3f}") for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", metavar="NAME=DIR", help="a label and a model directory from `python -m train`")
    p.add_argument("--out", default="runs/students", help="output folder (default runs/students)")
    a = p.parse_args(argv)
    rows = {}
    for spec in a.models:
        name, sep, d = spec.partition("=")
        if not sep or not name or not d:
            p.error(f"expected NAME=DIR, got {spec!r}")
        if not (Path(d) / "config.json").is_file():
            p.error(f"{d}: no config.json (not a model directory written by `python -m train`)")
        rows[name] = describe(d)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    return write_results(out, "students", rows, table(rows))


if __name__ == "__main__":
    sys.exit(main())
