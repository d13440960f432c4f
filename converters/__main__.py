"""`python -m converters {onnx,…,all} --checkpoint DIR --out DIR` — export with parity on real images;
`python -m converters benchmark …` — one table across formats and peers (converters/benchmark/)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sdk import HierfgError

from ._common import ExportError
from ._registry import TARGETS, export_all, export_checkpoint, summary_line


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["benchmark"]:  # its own options: one table across formats and peers
        from .benchmark import main as benchmark_main
        return benchmark_main(args[1:])
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
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            p.error(f"--option {kv}: the value must be JSON, e.g. --option opset=18")
    if a.target == "all" and opts:
        p.error("--option applies to one target; 'all' uses each target's defaults")
    try:
        if a.target == "all":
            export_all(a.checkpoint, a.out, data=a.data, split=a.split, n_parity=a.parity_images)
        else:
            print(summary_line(export_checkpoint(a.checkpoint, a.target, Path(a.out), data=a.data, split=a.split,
                                                 n_parity=a.parity_images, options=opts)))
    except (ExportError, FileNotFoundError, HierfgError) as e:  # a bad checkpoint, option or artifact: say which
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
