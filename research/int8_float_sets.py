"""Which layers kept in float would make int8 agree with fp32? Measured in the PyTorch int8 simulation.

    python research/int8_float_sets.py --checkpoint runs/student --data $G [--sets none,backbone,...]
        [--calibration-images 300] [--limit N] [--bias-correction all|backbone|none]
        [--rounding nearest|gptq] [--json out.json]

`python -m quantize` chooses its float families greedily on training photos from outside the 20 %
slice (`quantize.sensitivity`). Those photos are easy for a model trained on their distribution, so
the choice cannot see what happens on `val`, where fp32 has more near-ties. This script takes fixed
float sets instead and reports, for each, the fine top-1 agreement of the simulated int8 model with
fp32 (tree-consistent decoding, as the SDK answers), the mean KL of the fine distribution, and how
many answers differ, on `val` and on the 20 % train slice: the evidence behind "which layers were
tried in float". Calibration and bias correction are those of `python -m quantize` (same photos,
same ranges). `--rounding gptq` rounds the int8 weights with GPTQ (`research.gptq`) instead of to
nearest; weights are simulated on the ExecuTorch /
TFLite observers' grid (`quantize.sim.OBSERVER_EPS`). The simulation is not the artifacts' arithmetic: for `runs/student` the quantize report's
"agreement with PyTorch sim" column gives 98.99 % (ExecuTorch) and 98.65 % (TFLite) on `val`, 99.62
and 100 % on the slice (`runs/int8-relu6`, since conv outputs are quantized after their ReLU6 as the
simulation assumes; 97.0 and 99.0 % on `val` before), so read differences of a photo or two between
sets as noise.

Float sets (the quantize families of `quantize.sim.families` with the backbone in thirds, the grouping
these sets and their figures were measured with; LayerNorm and log-softmax inputs are always float, as in
every artifact):
    none            everything int8 (the plan `python -m quantize` writes when the greedy pass stops at once)
    stem            stem + the first third of the backbone blocks float
    backbone-2/3    the first two thirds of the backbone blocks float
    backbone        the whole backbone float, the query head int8
    head            the query head (token projections, attention, FFNs, CAMP, read-out) float, backbone int8
    weights-only    every layer's weights int8, every activation float (weight rounding alone)
    all             nothing int8: the simulation's own check (must agree 100 %)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETS = ("none", "stem", "backbone-2/3", "backbone", "head", "weights-only", "all")


def families_in_thirds(model) -> list:
    """`quantize.sim.families` with the backbone in thirds (stem + the first third of the blocks, the second
    third, the last third + head conv): the grouping these sets and their figures were measured with."""
    from quantize.sim import Family, families
    nb = model.backbone.num_blocks
    a, b = nb // 3, 2 * nb // 3
    blk = lambda a, b: tuple(f"backbone._blocks.{i}" for i in range(a, b))  # noqa: E731
    return [Family(f"backbone blocks 0-{a - 1} + stem", ("backbone._conv_stem",) + blk(0, a)),
            Family(f"backbone blocks {a}-{b - 1}", blk(a, b)),
            Family(f"backbone blocks {b}-{nb - 1} + head conv", blk(b, nb) + ("backbone._conv_head",)),
            *[f for f in families(model) if not f.name.startswith("backbone")]]


def float_set(name: str, fams: list) -> tuple[set[str], bool]:
    """(families quantized, weights_only) for a named float set; `fams` in graph order."""
    from quantize.sim import ALWAYS_FLOAT
    if name == "weights-only":
        return {f.name for f in fams if f.prefixes}, True
    quantizable = [f.name for f in fams if f.name not in ALWAYS_FLOAT]
    backbone = [n for n in quantizable if n.startswith("backbone")]
    floats = {"none": [], "stem": backbone[:1], "backbone-2/3": backbone[:2], "backbone": backbone,
              "head": [n for n in quantizable if n not in backbone], "all": quantizable}[name]
    return {n for n in quantizable if n not in floats}, False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="model directory written by `python -m train`")
    p.add_argument("--data", required=True, help="Grocery Store root")
    p.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, any of {', '.join(SETS)}")
    p.add_argument("--calibration-images", type=int, default=300)
    p.add_argument("--limit", type=int, default=0, help="judge at most N images per split (0 = all)")
    p.add_argument("--bias-correction", choices=("all", "backbone", "none"), default="all",
                   help="which layers get quantize.bias's weight-rounding correction: every quantized layer (as "
                        "`python -m quantize` does), only the backbone's, or none")
    p.add_argument("--rounding", choices=("nearest", "gptq"), default="nearest",
                   help="int8 weight rounding: round-to-nearest (what `python -m quantize` writes by default) or "
                        "GPTQ's error-compensating rounding on the calibration photos (`research.gptq`)")
    p.add_argument("--json", help="also write the records to this file")
    a = p.parse_args(argv)
    sets = [s for s in a.sets.split(",") if s]
    bad = [s for s in sets if s not in SETS]
    if bad or not sets:
        p.error(f"unknown float set(s) {bad}; choose from {', '.join(SETS)}")
    if not (Path(a.checkpoint) / "model.safetensors").is_file():
        p.error(f"{a.checkpoint}: no model.safetensors (a `python -m train` model directory)")
    if not Path(a.data).is_dir():
        p.error(f"{a.data}: not a directory")

    from quantize.bias import rounding_shifts
    from quantize.calibration import calibration_sets, evaluation_sets
    from quantize.sensitivity import disagreements, fine_kl
    from quantize.sim import calibrate, model_logprobs, simulate
    from research.output import print_table
    from research.weights import with_weights
    from train.checkpoint import load_model

    model, cfg, tax, _ = load_model(a.checkpoint)
    cal, _ = calibration_sets(a.data, cfg.image_size, tax, a.calibration_images, 0)
    evals = evaluation_sets(a.data, cfg.image_size, tax, limit=a.limit)
    fams = families_in_thirds(model)
    ranges = calibrate(model, cal.images)
    corrected = [f for f in fams if f.prefixes and (a.bias_correction == "all" or f.name.startswith("backbone"))]
    rounded = None
    if a.rounding == "gptq":
        from research.gptq import gptq_weights
        rounded = gptq_weights(model, cal.images, [f for f in fams if f.prefixes], log=print)
    shifts = None if a.bias_correction == "none" else rounding_shifts(model, cal.images, corrected, targets=rounded)
    ref = {k: model_logprobs(model, s.images) for k, s in evals.items()}
    out: dict = {"checkpoint": a.checkpoint, "calibration": cal.source, "bias_correction": [f.name for f in corrected] if shifts else [],
                 "rounding": a.rounding, "evaluation_sets": {k: s.source for k, s in evals.items()}, "sets": {}}
    for name in sets:
        quantized, weights_only = float_set(name, fams)
        # GPTQ's weights sit on the int8 grid, so the simulation's own rounding keeps them
        src = model if rounded is None else with_weights(model, rounded, [f for f in fams if f.name in quantized])
        sim = simulate(src, ranges, quantized, weights_only=weights_only, shifts=shifts, fams=fams)
        rec = {"quantized_families": sorted(quantized), "weights_only": weights_only, "splits": {}}
        for split, s in evals.items():
            lp = model_logprobs(sim, s.images)
            d = disagreements(tax, ref[split], lp)  # decodes both once; the agreement follows from its count
            rec["splits"][split] = {"fine_agreement": 1.0 - d["disagreeing"] / d["n"],
                                    "fine_kl": fine_kl(ref[split], lp), "disagreeing": d["disagreeing"], "n": d["n"],
                                    "fp32_gap_of_disagreeing": d["fp32_gap_of_disagreeing"]}
            r = rec["splits"][split]
            print(f"{name:13s} {split:8s} agreement {r['fine_agreement'] * 100:6.2f} % ({r['disagreeing']}/{r['n']} differ)"
                  f"  KL {r['fine_kl']:.2e}", flush=True)
        out["sets"][name] = rec
    splits = list(evals)
    lines = ["| float set | " + " | ".join(f"{s} agreement | {s} differ | {s} KL" for s in splits) + " |",
             "|---|" + "---|---|---|" * len(splits)]
    for name, rec in out["sets"].items():
        cells = [f"{r['fine_agreement'] * 100:.2f} % | {r['disagreeing']}/{r['n']} | {r['fine_kl']:.2e}"
                 for r in (rec["splits"][s] for s in splits)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return print_table(lines, out, a.json)


if __name__ == "__main__":
    sys.exit(main())
