"""How many fp32 answers does a weight perturbation of int8's size change? The noise floor of the agreement bar.

    python research/int8_noise_floor.py --checkpoint runs/student --data $G
        [--alphas 1,0.25,0.0625] [--draws 20] [--seed 0] [--limit N] [--families "NAME;NAME"] [--json out.json]

`python -m quantize`'s bar asks int8 to change at most 1 % of the fine answers fp32 gives (on `val`:
2 of 296). Every answer int8 still changes is one fp32 gives with a small top-two gap, and int8
*weights* alone, every activation float, already change about as many as the whole int8 model
(`research/int8_float_sets.py --sets weights-only`). This script asks how much of that is the
particular rounding and how much is the model: it perturbs the weights of every layer the int8
artifacts quantize (every Conv2d / Linear of `quantize.sim.families`) and counts the changed fine
answers (tree-consistent decoding, as the SDK answers) on `val` and on the 20 % train slice.

Perturbations, all weights-only, activations float:
    fp16            weights rounded to float16 (a perturbation about 2**-11 relative)
    int8-nearest    int8 per output channel, symmetric, round-to-nearest: what every artifact rounds
                    (BatchNorm folding factor included, as `quantize.sim.fq_weight` does)
    noise@A         `--draws` independent draws of w + A * step * u, u uniform in [-1/2, 1/2] per weight,
                    step = the layer's int8 per-channel step. A = 1 is int8 rounding's error magnitude
                    without its particular signs; A = 1/4 is 10-bit weights, 1/16 12-bit.

`--families` perturbs only the named layer families of `quantize.sim.families` (`;`-separated, e.g.
"backbone stem;backbone stage 0 (block 0)"), everything else exact: where the weight precision matters.

Every perturbation gets the bias correction the int8 artifacts get (the mean output shift it causes,
measured on the calibration photos of `python -m quantize`, folded into biases / BatchNorm means;
`--bias-correction none` turns it off). For each noise level it reports the mean, minimum and maximum number of changed answers over the draws,
the share of draws that change at most the bar's number (`quantize.bar.MIN_AGREEMENT`) and the share
that also lose at most `quantize.bar.MAX_TOP1_DROP` fine top-1: an estimate of how often a rounding of
that size, chosen with no knowledge of `val`, would pass the bar by luck.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_alphas(text: str) -> list[float]:
    out = []
    for t in text.split(","):
        t = t.strip()
        if not t:
            continue
        v = float(t)
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"noise level {t!r}: must be a positive number")
        out.append(v)
    if not out:
        raise ValueError("no noise level given")
    return out


def perturbed_weights(model, layers: list[str], how: str, alpha: float = 0.0, generator=None) -> dict:
    """{layer: perturbed weight} for `layers` (Conv2d / Linear module names) of `model` (not modified)."""
    import torch

    from quantize.sim import fold_factors, fq_weight, weight_scale
    folds = fold_factors(model)
    mods = dict(model.named_modules())
    out = {}
    with torch.no_grad():
        for name in layers:
            w = mods[name].weight.detach()
            if how == "fp16":
                out[name] = w.half().float()
            elif how == "int8-nearest":
                out[name] = fq_weight(w, folds.get(name))
            elif how == "noise":
                step = weight_scale(w, folds.get(name)).reshape(-1, *([1] * (w.dim() - 1)))
                u = torch.rand(w.shape, generator=generator, dtype=torch.float32) - 0.5
                out[name] = w + alpha * step * u
            else:
                raise ValueError(how)
    return out


def perturbed(model, weights: dict, fams: list, calibration=None):
    """A copy of `model` carrying `weights`; with `calibration` (uint8 NHWC photos) the mean output shift
    the perturbation causes is measured on them and folded into biases / BatchNorm means, as
    `python -m quantize` does for int8 rounding (`quantize.bias`)."""
    import copy

    from quantize.bias import apply_shifts, rounding_shifts
    from research.weights import take_weights
    sim = copy.deepcopy(model).eval()
    if calibration is not None:
        apply_shifts(sim, rounding_shifts(model, calibration, fams, targets=weights), fams)
    take_weights(sim, weights, fams)
    return sim


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="model directory written by `python -m train`")
    p.add_argument("--data", required=True, help="Grocery Store root")
    p.add_argument("--alphas", default="1,0.25,0.0625",
                   help="noise levels, in int8 steps (1 = int8 rounding's size, 0.25 = 10-bit, 0.0625 = 12-bit)")
    p.add_argument("--draws", type=int, default=20, help="independent noise draws per level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="judge at most N images per split (0 = all)")
    p.add_argument("--bias-correction", choices=("all", "none"), default="all",
                   help="fold each perturbation's mean output shift on the calibration photos into the biases "
                        "(as `python -m quantize` does) or not")
    p.add_argument("--calibration-images", type=int, default=300, help="photos the bias correction is measured on")
    p.add_argument("--families", default="",
                   help="perturb only these layer families (`;`-separated names from quantize.sim.families; default all)")
    p.add_argument("--json", help="also write the records to this file")
    a = p.parse_args(argv)
    try:
        alphas = parse_alphas(a.alphas)
    except ValueError as e:
        p.error(str(e))
    if a.draws < 1:
        p.error("--draws must be at least 1")
    if not (Path(a.checkpoint) / "model.safetensors").is_file():
        p.error(f"{a.checkpoint}: no model.safetensors (a `python -m train` model directory)")
    if not Path(a.data).is_dir():
        p.error(f"{a.data}: not a directory")

    import numpy as np
    import torch
    import torch.nn as nn

    from quantize.bar import MAX_TOP1_DROP, agreement_within, meets_bar
    from quantize.calibration import calibration_sets, evaluation_sets
    from quantize.sensitivity import disagreements, fine_kl, fine_top1
    from quantize.sim import families, model_logprobs
    from research.output import print_table
    from train.checkpoint import load_model

    model, cfg, tax, _ = load_model(a.checkpoint)
    model.eval()
    fams = [f for f in families(model) if f.prefixes]
    if a.families.strip():
        wanted = [n.strip() for n in a.families.split(";") if n.strip()]
        unknown = [n for n in wanted if n not in {f.name for f in fams}]
        if unknown:
            p.error(f"unknown layer families {unknown}; known: {[f.name for f in fams]}")
        fams = [f for f in fams if f.name in wanted]
    evals = evaluation_sets(a.data, cfg.image_size, tax, limit=a.limit)
    cal = None
    if a.bias_correction == "all":
        cal, _ = calibration_sets(a.data, cfg.image_size, tax, a.calibration_images, 0)
    cal_images = None if cal is None else cal.images
    layers = [n for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and any(f.owns(n) for f in fams)]
    ref = {k: model_logprobs(model, s.images) for k, s in evals.items()}
    ref_top1 = {k: fine_top1(tax, ref[k], s.labels) for k, s in evals.items()}
    # the most changed answers the bar's own rule (quantize.bar) accepts on each split
    allowed = {k: max(c for c in range(len(s) + 1) if agreement_within(1 - c / len(s))) for k, s in evals.items()}
    print(f"{len(layers)} layers perturbed; the bar allows "
          + ", ".join(f"{allowed[k]} of {len(s.images)} changed on {k}" for k, s in evals.items()), flush=True)

    def judge(sim) -> dict:
        rec = {}
        for split, s in evals.items():
            lp = model_logprobs(sim, s.images)
            d = disagreements(tax, ref[split], lp)
            drop = ref_top1[split] - fine_top1(tax, lp, s.labels)
            rec[split] = {"changed": d["disagreeing"], "n": d["n"], "fine_kl": fine_kl(ref[split], lp),
                          "fine_top1_drop": drop, "meets_bar": meets_bar(1 - d["disagreeing"] / d["n"], drop),
                          "fp32_gap_of_changed": d["fp32_gap_of_disagreeing"]}
        return rec

    out: dict = {"checkpoint": a.checkpoint, "families": [f.name for f in fams], "layers": len(layers),
                 "allowed_changes": allowed,
                 "bias_correction": cal.source if cal is not None else None,
                 "evaluation_sets": {k: s.source for k, s in evals.items()}, "fixed": {}, "noise": {}}
    for how in ("fp16", "int8-nearest"):
        rec = judge(perturbed(model, perturbed_weights(model, layers, how), fams, cal_images))
        out["fixed"][how] = rec
        print(f"{how:14s} " + "  ".join(f"{k}: {r['changed']}/{r['n']} changed, drop {r['fine_top1_drop'] * 100:+.1f} pt, "
                                          f"KL {r['fine_kl']:.2e}" for k, r in rec.items()), flush=True)
    g = torch.Generator().manual_seed(a.seed)
    for alpha in alphas:
        draws = []
        for i in range(a.draws):
            rec = judge(perturbed(model, perturbed_weights(model, layers, "noise", alpha, g), fams, cal_images))
            draws.append(rec)
            print(f"noise@{alpha:<8g} draw {i:2d} " + "  ".join(
                f"{k}: {r['changed']} changed, drop {r['fine_top1_drop'] * 100:+.1f} pt, KL {r['fine_kl']:.2e}"
                for k, r in rec.items()), flush=True)
        summ = {}
        for split in evals:
            c = np.array([d[split]["changed"] for d in draws])
            summ[split] = {"mean_changed": float(c.mean()), "min_changed": int(c.min()), "max_changed": int(c.max()),
                           "share_within_bar": float((c <= allowed[split]).mean()),
                           "share_meeting_bar": float(np.mean([d[split]["meets_bar"] for d in draws])),
                           "mean_fine_top1_drop": float(np.mean([d[split]["fine_top1_drop"] for d in draws])),
                           "mean_fine_kl": float(np.mean([d[split]["fine_kl"] for d in draws]))}
        out["noise"][f"{alpha:g}"] = {"draws": draws, "summary": summ}

    splits = list(evals)
    lines = ["| weights | " + " | ".join(f"{s} changed (mean, min–max) | {s} ≤ {allowed[s]} changed | {s} meets bar "
                                      f"(+ drop ≤ {MAX_TOP1_DROP * 100:g} pt) | {s} KL" for s in splits) + " |",
             "|---|" + "---|---|---|---|" * len(splits)]
    for how, rec in out["fixed"].items():
        lines.append(f"| {how} | " + " | ".join(
            f"{rec[s]['changed']} | {'yes' if rec[s]['changed'] <= allowed[s] else 'no'} | {'yes' if rec[s]['meets_bar'] else 'no'} | "
            f"{rec[s]['fine_kl']:.2e}" for s in splits) + " |")
    for alpha, rec in out["noise"].items():
        cells = [f"{r['mean_changed']:.1f} ({r['min_changed']}–{r['max_changed']}) | {r['share_within_bar'] * 100:.0f} % | "
                 f"{r['share_meeting_bar'] * 100:.0f} % | {r['mean_fine_kl']:.2e}"
                 for r in (rec["summary"][s] for s in splits)]
        lines.append(f"| noise × {alpha} int8 step ({a.draws} draws) | " + " | ".join(cells) + " |")
    return print_table(lines, out, a.json)


if __name__ == "__main__":
    sys.exit(main())
