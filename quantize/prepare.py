"""What every target is made from: the checkpoint, its real photos, activation ranges, the bias
correction of int8 weight rounding, and the float plan measured on photos that did not calibrate."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ._common import QuantContext
from .bias import rounding_shifts
from .calibration import ImageSet, calibration_sets, evaluation_sets
from .recipes import resolve_recipes
from .sensitivity import choose_float_families
from .sim import calibrate, families


def _trained_without_slice(checkpoint: Path, conf: dict[str, Any]) -> bool:
    """Did training hold out the same 20 % stratified train slice (seed 0) that int8 is judged on?"""
    tc = conf.get("train", {})
    return ((checkpoint / "holdout.txt").is_file() and abs(float(tc.get("holdout_fraction", 0)) - 0.2) < 1e-9
            and int(tc.get("seed", 0)) == 0 and tc.get("train_split", "train") == "train")


def prepare_context(checkpoint: str | Path, data: str, targets: Sequence[str], n_calibration: int = 300,
                    n_sensitivity: int = 200, eval_limit: int = 0, n_parity: int = 64,
                    log: Callable[[str], None] = print) -> QuantContext:
    """Load the checkpoint, decode the real photos, calibrate, measure the shifts of int8 weight rounding,
    choose the float families by measurement; the context of static activations."""
    from train.checkpoint import load_model, manifest_model_record

    resolve_recipes(targets)  # an unknown target fails before any work
    model, cfg, tax, conf = load_model(checkpoint)
    size = cfg.image_size
    log(f"decoding real photos at {size} px (calibration {n_calibration}, sensitivity {n_sensitivity})")
    held_out = _trained_without_slice(Path(checkpoint), conf)
    cal, sen = calibration_sets(data, size, tax, n_calibration, n_sensitivity, sensitivity_from_slice=held_out)
    evals = evaluation_sets(data, size, tax, limit=eval_limit)
    log(f"calibrating activation ranges on {cal.source}")
    ranges = calibrate(model, cal.images)
    layer_fams = [f for f in families(model) if f.prefixes]
    log(f"measuring the mean output shift of int8 weight rounding per channel on {cal.source}")
    int8_shifts = rounding_shifts(model, cal.images, layer_fams)
    coreml_shifts = None
    if "coreml" in targets:  # Core ML rounds the fp32 weights itself, without the observers' scale clamp
        coreml_shifts = rounding_shifts(model, cal.images, layer_fams, weight_eps=0.0)
    log(f"sensitivity pass on {sen.source}")
    plan = choose_float_families(model, ranges, sen.images, sen.labels, tax, source=sen.source, log=log,
                                 shifts=int8_shifts)
    log(f"float families: {plan.float_families}")
    val = evals["val"]
    idx = np.linspace(0, len(val) - 1, num=min(n_parity, len(val))).round().astype(int)
    parity = ImageSet(val.images[idx], val.labels[idx], f"{val.source}, {len(idx)} for parity")
    return QuantContext(model, tax, size, cal, parity, plan, ranges, manifest_model_record(checkpoint, cfg, conf), log,
                        coreml_shifts=coreml_shifts, evals=evals, int8_shifts=int8_shifts, checkpoint=str(checkpoint),
                        data=str(data), conf=conf).for_scheme()
