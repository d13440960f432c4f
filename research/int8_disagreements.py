"""Where exported artifacts change the fp32 model's answer, and how sure fp32 was there.

    python research/int8_disagreements.py --checkpoint runs/student --data $G \
        runs/int8/executorch runs/int8/tflite [--limit N] [--json out.json]

For each artifact (any directory `sdk.Classifier.load` opens) on `val` and on the 20 % stratified
train slice (the sets `python -m quantize` judges int8 on): how many decoded fine answers differ from
the PyTorch fp32 checkpoint, fp32's gap between its two most likely fine classes on each of them, and
the agreement on the images fp32 answers with a gap of at least 0.1 (`quantize.sensitivity.disagreements`,
the record `python -m quantize` writes into its report), and the mean KL of the fine distribution to
fp32, which separates two schemes where the counts of a 296-photo split are noise. Use it on artifacts
made before those records existed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="+", help="artifact directories (manifest.json + model file)")
    p.add_argument("--checkpoint", required=True, help="the fp32 model directory the artifacts came from")
    p.add_argument("--data", required=True, help="Grocery Store root")
    p.add_argument("--limit", type=int, default=0, help="judge at most N images per set (0 = all)")
    p.add_argument("--json", help="also write the records to this file")
    a = p.parse_args(argv)
    for d in [a.checkpoint, *a.artifacts]:
        if not Path(d).is_dir():
            p.error(f"{d}: not a directory")

    from quantize.calibration import evaluation_sets
    from quantize.run import sdk_logprobs
    from quantize.sensitivity import disagreements, fine_kl
    from quantize.sim import model_logprobs
    from train.checkpoint import load_model

    model, cfg, tax, _ = load_model(a.checkpoint)
    out: dict[str, dict[str, dict]] = {}
    for split, s in evaluation_sets(a.data, cfg.image_size, tax, limit=a.limit).items():
        ref = model_logprobs(model, s.images)
        for art in a.artifacts:
            lp = sdk_logprobs(Path(art), s.images)
            d = disagreements(tax, ref, lp, names=s.names)
            d["fine_kl"] = fine_kl(ref, lp)  # mean KL(fp32 || artifact) of the fine distribution: less noisy than counts
            out.setdefault(art, {})[split] = d
            sure = d["agreement_when_fp32_sure"]
            print(f"{art} {split}: {d['disagreeing']}/{d['n']} differ, fine KL {d['fine_kl']:.2e}; fp32 gaps there "
                  f"{d['fp32_gap_of_disagreeing']}; agreement where fp32's gap >= {d['near_tie']}: "
                  f"{'–' if sure is None else f'{sure:.4f}'} ({d['sure_images']} images)", flush=True)
            for c in d.get("changed", []):
                print(f"  {c['image']}: fp32 {c['fp32']} -> int8 {c['int8']} (fp32 gap {c['fp32_gap']})")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
