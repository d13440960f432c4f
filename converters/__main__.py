"""`python -m converters {onnx,…,all} --checkpoint DIR --out DIR` — export with parity on real images."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._registry import TARGETS, export_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m converters", description="Export a trained hierfg model.")
    p.add_argument("target", choices=[*TARGETS, "all"], help="target format, or all of them")
    p.add_argument("--checkpoint", required=True, help="model directory written by `python -m train`")
    p.add_argument("--out", required=True, help="output directory (one sub-folder per target with 'all')")
    p.add_argument("--data", help="dataset root for parity images (default: the one the model was trained on)")
    p.add_argument("--split", default="val", help="split for parity images (default val)")
    p.add_argument("--parity-images", type=int, default=64, help="number of real images for the parity check")
    p.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                   help="target option, e.g. --option opset=18 (validated against the target's table)")
    a = p.parse_args(argv)
    opts = {}
    for kv in a.option:
        k, _, v = kv.partition("=")
        opts[k] = json.loads(v)
    targets = list(TARGETS) if a.target == "all" else [a.target]
    for t in targets:
        out = Path(a.out) / t if a.target == "all" else Path(a.out)
        art = export_checkpoint(a.checkpoint, t, out, data=a.data, split=a.split, n_parity=a.parity_images,
                                options=opts if a.target != "all" else {})
        par = art.manifest.metrics.get("parity", {})
        fine = art.manifest.taxonomy.level_names[-1]
        print(f"{t}: wrote {art.path} ({art.manifest.size_bytes / 1e6:.2f} MB) + manifest.json; "
              f"fine agreement with PyTorch {par.get(f'agreement/{fine}', float('nan')):.4f} on {par.get('n_images')} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
