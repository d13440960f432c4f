"""What every target is made from: the checkpoint, its real photos, activation ranges, the bias
correction of int8 weight rounding, and the float plan measured on photos that did not calibrate."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from sdk import Taxonomy

from ._common import QuantContext
from .bias import bias_corrected, rounding_shifts
from .calibration import ImageSet, calibration_sets, evaluation_sets
from .recipes import resolve_recipes
from .sensitivity import Plan, choose_float_families
from .sim import Ranges, calibrate, dynamic_scheme, families


@dataclass
class Prepared:
    """The loaded model, its decoded photo sets, ranges, rounding shifts and measured plan."""

    checkpoint: str
    data: str
    model: torch.nn.Module
    taxonomy: Taxonomy
    image_size: int
    conf: dict[str, Any]  # the checkpoint's config.json
    info: dict[str, Any]  # what every manifest records about the model (checkpoint hash, config, metrics)
    calibration: ImageSet
    parity: ImageSet  # val photos for the export-time parity check
    evals: dict[str, ImageSet]  # the judging sets: val and the 20 % train slice
    ranges: Ranges  # activation ranges of the fp32 model on the calibration photos
    int8_shifts: dict[str, torch.Tensor]  # mean output shift of int8 weight rounding per layer
    coreml_shifts: dict[str, torch.Tensor] | None  # the same for Core ML's rounding (no scale clamp)
    plan: Plan
    log: Callable[[str], None] = print
    fp32_exports: dict = field(default_factory=dict)  # one fp32 export per target, shared by every context

    @cached_property
    def ctx(self) -> QuantContext:
        """The context of the measured plan with static activations."""
        return self.context()

    def context(self, dynamic: bool = False) -> QuantContext:
        """The context of the plan: its int8 source model (bias correction on the plan's quantized families)
        and the activation ranges the backends' observers see on it. `dynamic`: for ExecuTorch's dynamic
        scheme (`quantize.sim.DynamicScheme`), whose float layers (depthwise convs, the stem) are neither
        rounded nor corrected."""
        cal, plan = self.calibration, self.plan
        scheme = dynamic_scheme(self.model, set(plan.quantized), cal.images) if dynamic else None
        skip = scheme.float if scheme is not None else frozenset()
        quantized = [f for f in families(self.model) if f.name in plan.quantized]
        int8_model, bc = bias_corrected(self.model, {k: v for k, v in self.int8_shifts.items() if k not in skip},
                                        quantized, len(cal), cal.source)
        self.log(f"bias correction: {bc.layers} layers (largest shift {bc.max_shift:.3g})")
        ranges = calibrate(int8_model, cal.images)  # what the backends' observers see
        info = {**self.info, "bias_correction": bc.to_dict()}
        return QuantContext(self.model, self.taxonomy, self.image_size, cal, self.parity, plan, ranges, info, self.log,
                            int8_model=int8_model, coreml_shifts=self.coreml_shifts, fp32_exports=self.fp32_exports,
                            dynamic=scheme)


def _trained_without_slice(checkpoint: Path, conf: dict[str, Any]) -> bool:
    """Did training hold out the same 20 % stratified train slice (seed 0) that int8 is judged on?"""
    tc = conf.get("train", {})
    return ((checkpoint / "holdout.txt").is_file() and abs(float(tc.get("holdout_fraction", 0)) - 0.2) < 1e-9
            and int(tc.get("seed", 0)) == 0 and tc.get("train_split", "train") == "train")


def _parity_set(val: ImageSet, n: int) -> ImageSet:
    idx = np.linspace(0, len(val) - 1, num=min(n, len(val))).round().astype(int)
    return ImageSet(val.images[idx], val.labels[idx], f"{val.source}, {len(idx)} for parity")


def prepare_context(checkpoint: str | Path, data: str, targets: Sequence[str], n_calibration: int = 300,
                    n_sensitivity: int = 200, eval_limit: int = 0, n_parity: int = 64,
                    log: Callable[[str], None] = print) -> Prepared:
    """Load the checkpoint, decode the real photos, calibrate, measure the shifts of int8 weight rounding,
    and choose the float families by measurement."""
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
    info = manifest_model_record(checkpoint, cfg, conf)
    return Prepared(str(checkpoint), str(data), model, tax, size, conf, info, cal, _parity_set(evals["val"], n_parity),
                    evals, ranges, int8_shifts, coreml_shifts, plan, log)
