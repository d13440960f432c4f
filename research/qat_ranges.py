"""Where pt2e QAT starts, and where a short run takes it, measured in the fake-quantized graph itself.

    python research/qat_ranges.py --checkpoint runs/student --data $G \
        [--ranges ptq,minmax] [--lrs 1e-5,1e-6] [--images 600] [--epochs 1] [--limit N] [--json out.json]

`python research/qat.py` judges the lowered artifact after training. This looks inside: for
each activation-range scheme of `research.qat.prepare` (`ptq`: the post-training histogram ranges,
frozen; `minmax`: min/max over the calibration photos, then moving averages) it builds the ExecuTorch
QAT graph from the same context `python -m quantize` uses (`quantize.run.prepare_context`: calibration,
plan, bias correction), judges it before training, then for each learning rate trains a copy with
`research.qat.train` (KL to fp32, AdamW, random crop + flip) on `--images` training photos outside the
20 % slice and judges it after every epoch. Judged on all of `val` and the slice against fp32: fine
answers changed (decoded paths), mean fine KL to fp32 and fine top-1. The graphs run one photo at a
time, as the post-training pt2e graph does, so the `ptq` start is exactly the PTQ graph.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def judge(gm, evals, ref, taxonomy) -> dict:
    from quantize.sensitivity import fine_kl
    from research.int8_runtime_gap import graph_logprobs  # the converted graphs' runner: batch 1, per photo
    from sdk import TreeDecoder
    dec = TreeDecoder(taxonomy)
    out = {}
    for k, s in evals.items():
        lp = graph_logprobs(gm, s.images)[:taxonomy.depth]  # the levels; the embedding follows them
        a, b = dec.paths(ref[k])[:, -1], dec.paths(lp)[:, -1]
        out[k] = {"n": len(s.images), "changed": int((a != b).sum()), "fine_kl": fine_kl(ref[k], lp),
                  "fp32_top1": float((a == s.labels[:, -1]).mean()), "top1": float((b == s.labels[:, -1]).mean())}
    return out


def _line(tag: str, rec: dict) -> str:
    return tag + "  " + "  ".join(f"{k}: changed {r['changed']}/{r['n']}, KL {r['fine_kl']:.2e}, top-1 "
                                  f"{r['fp32_top1']:.3f} -> {r['top1']:.3f}" for k, r in rec.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="the fp32 model directory")
    p.add_argument("--data", required=True, help="Grocery Store root")
    p.add_argument("--ranges", default="ptq,minmax", help="comma-separated subset of ptq,minmax")
    p.add_argument("--lrs", default="1e-5,1e-6", help="comma-separated QAT learning rates (AdamW)")
    p.add_argument("--images", type=int, default=600, help="QAT training photos (0: all outside the slice)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--freeze-blocks", default="0",
                   help="comma-separated: backbone blocks [0, N) and the stem not trained (python -m quantize's default "
                        "is the checkpoint's training freeze_blocks; 'ckpt' stands for it)")
    p.add_argument("--limit", type=int, default=0, help="judge at most N images per set (0 = all)")
    p.add_argument("--calibration-images", type=int, default=300)
    p.add_argument("--sensitivity-images", type=int, default=200)
    p.add_argument("--json", help="also write the records to this file")
    a = p.parse_args(argv)

    from quantize.executorch import quantized_module_names, xnnpack_quantizer
    from quantize.run import prepare_context
    from research import qat as Q
    from quantize.sim import model_logprobs

    ranges = [r.strip() for r in a.ranges.split(",") if r.strip()]
    lrs = [float(x) for x in a.lrs.split(",") if x.strip()]
    ctx = prepare_context(a.checkpoint, a.data, ["executorch"], a.calibration_images, a.sensitivity_images, a.limit)
    tax = ctx.taxonomy
    ref = {k: model_logprobs(ctx.model, s.images) for k, s in ctx.evals.items()}
    names = quantized_module_names(ctx)
    photos = Q.training_set(a.data, ctx.image_size, tax, a.images, 0)
    ckpt_freeze = int(ctx.conf.get("train", {}).get("freeze_blocks", 0))
    freezes = [ckpt_freeze if f.strip() == "ckpt" else int(f) for f in a.freeze_blocks.split(",") if f.strip()]
    out = {"checkpoint": a.checkpoint, "images": {k: s.source for k, s in ctx.evals.items()},
           "qat_images": photos.source, "float_families": ctx.plan.float_families, "runs": []}
    for r in ranges:
        start = Q.prepare(ctx, lambda is_qat: xnnpack_quantizer(names, is_qat=is_qat), r)
        rec = {"ranges": r, "lr": None, "epoch": 0, **judge(start, ctx.evals, ref, tax)}
        out["runs"].append(rec)
        print(_line(f"{r:6s} start          ", {k: rec[k] for k in ctx.evals}), flush=True)
        for lr in lrs:
            for fz in freezes:
                gm = copy.deepcopy(start)
                for e in range(a.epochs):
                    t0 = time.time()
                    # one epoch per call: the observers of `minmax` keep updating (as in a 1-epoch run)
                    hist = Q.train(gm, ctx, photos, Q.QATConfig(epochs=1, lr=lr, seed=e, ranges=r, freeze_blocks=fz),
                                   log=lambda *_: None)
                    rec = {"ranges": r, "lr": lr, "freeze_blocks": fz, "epoch": e + 1,
                           "train_kl": hist["history"][0]["kl_to_fp32"], "trainable_params": hist["trainable_params"],
                           "seconds": round(time.time() - t0, 1), **judge(gm, ctx.evals, ref, tax)}
                    out["runs"].append(rec)
                    print(_line(f"{r:6s} lr {lr:.0e} freeze {fz:2d} epoch {e + 1}", {k: rec[k] for k in ctx.evals})
                          + f"  (train KL {rec['train_kl']:.2e})", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
