"""What every target is made from (`prepare_context`: the checkpoint, its real photos, activation ranges,
the bias correction of int8 weight rounding, the float plan measured on photos that did not calibrate) and
what the per-target modules share: the result record and the int8 manifest."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from converters import Artifact, ExportError, ExportSpec, export_model, finish_export, tool_versions
from sdk import Taxonomy

from .bias import bias_corrected, rounding_shifts
from .calibration import ImageSet, calibration_sets, evaluation_sets
from .sensitivity import Plan, choose_float_families
from .sim import ALWAYS_FLOAT, DynamicScheme, Family, Ranges, calibrate, dynamic_scheme, families

# Export-time parity floors: a sanity check that an artifact is not broken, not the bar (quantize.bar, judged
# on the evaluation sets). int8 moves a fine log-prob by up to about half a nat (0.62 on the shipped model's
# parity photos), so agreement counts only photos fp32 decides by at least 0.25 nats. Enrolled prototypes are
# made and compared through the same artifact, so a uniform int8 shift of the embedding moves no decision.
INT8_FLOORS = dict(min_agreement=0.95, max_abs_logprob=None, tie_margin=0.25, min_embedding_cosine=0.9)
FP32_FLOORS = dict(min_agreement=0.995, max_abs_logprob=1e-3, tie_margin=0.0, min_embedding_cosine=0.99)


class QuantizeError(ExportError):
    """Quantization could not produce a valid int8 artifact; the message says what to change."""


@contextmanager
def failing_as(what: str):
    """Any failure inside (a toolchain's own exception) surfaces as a QuantizeError naming `what`."""
    try:
        yield
    except QuantizeError:
        raise
    except Exception as e:
        raise QuantizeError(f"{what} failed: {type(e).__name__}: {e}") from e


@dataclass
class QuantContext:
    """Everything a target is made from: the fp32 model, its real-photo sets, the measured plan and, for one
    activation scheme, the bias-corrected int8 source model and the ranges the backends' observers see on it."""

    model: torch.nn.Module  # HierarchicalQueryModel, eval mode, fp32
    taxonomy: Taxonomy
    image_size: int
    calibration: ImageSet
    parity: ImageSet  # real photos for the export-time parity check through the SDK
    plan: Plan
    ranges: Ranges  # activation ranges of `int8_model` (before `for_scheme`: of the fp32 model)
    model_info: dict[str, Any] = field(default_factory=dict)  # what every manifest records about the model
    log: Callable[[str], None] = print
    int8_model: torch.nn.Module | None = None  # `model` with weight-rounding bias correction (quantize.bias)
    coreml_shifts: dict[str, torch.Tensor] | None = None  # rounding shifts of Core ML (no scale clamp)
    fp32_exports: dict[str, Artifact] = field(default_factory=dict)  # per target, shared by the schemes' contexts
    dynamic: DynamicScheme | None = None  # ExecuTorch's dynamic activations (None: static, calibrated)
    evals: dict[str, ImageSet] = field(default_factory=dict)  # the judging sets: val and the 20 % train slice
    int8_shifts: dict[str, torch.Tensor] = field(default_factory=dict)  # mean output shift of int8 weight rounding
    checkpoint: str = ""
    data: str = ""
    conf: dict[str, Any] = field(default_factory=dict)  # the checkpoint's config.json

    def for_scheme(self, dynamic: bool = False) -> QuantContext:
        """This context for static or (`dynamic`, `quantize.sim.DynamicScheme`) dynamic activations: the plan's
        quantized families bias-corrected in a copy of the model (the dynamic scheme's float layers neither
        rounded nor corrected), and the activation ranges of that copy."""
        cal = self.calibration
        scheme = dynamic_scheme(self.model, set(self.plan.quantized), cal.images) if dynamic else None
        skip = scheme.float if scheme is not None else frozenset()
        quantized = [f for f in self.families if f.name in self.plan.quantized]
        int8_model, bc = bias_corrected(self.model, {k: v for k, v in self.int8_shifts.items() if k not in skip},
                                        quantized, len(cal), cal.source)
        self.log(f"bias correction: {bc.layers} layers (largest shift {bc.max_shift:.3g})")
        return replace(self, int8_model=int8_model, ranges=calibrate(int8_model, cal.images), dynamic=scheme,
                       model_info={**self.model_info, "bias_correction": bc.to_dict()})

    @property
    def families(self) -> list[Family]:
        return families(self.model)

    @property
    def float_layer_families(self) -> list[Family]:
        return [f for f in self.families if f.name in self.plan.float_families and f.prefixes]

    def float_layers(self, float_ops_run_as: str) -> list[str]:
        """What stayed float, for the report and manifest: the plan's float layer families, then the ops
        no backend here quantizes (the global read-out is a Linear family, int8 unless the plan floats it)."""
        return [f"{f.name} (Conv/Linear not annotated)" for f in self.float_layer_families] + \
            ["attention matmuls + softmax, LayerNorm, residual adds, per-class query read-out and log-softmax "
             f"({float_ops_run_as})"]

    def deploy(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        """The uint8-in graph of `model` (default: the fp32 model)."""
        from train.models import DeployWrapper
        return DeployWrapper(self.model if model is None else model).eval()

    def spec(self, precision: str = "int8") -> ExportSpec:
        floors = INT8_FLOORS if precision == "int8" else FP32_FLOORS
        return ExportSpec(image_size=self.image_size, precision=precision, images=self.parity.images,
                          image_source=self.parity.source, model_info=self.model_info, **floors)

    def example(self) -> torch.Tensor:
        """One blank uint8 NHWC image: the example input the int8 graphs are exported with (batch 1)."""
        return torch.zeros(1, self.image_size, self.image_size, 3, dtype=torch.uint8)

    def calibration_batches(self, batch: int = 10) -> list[np.ndarray]:
        imgs = self.calibration.images
        return [np.ascontiguousarray(imgs[i:i + batch]) for i in range(0, len(imgs), batch)]


@dataclass
class TargetResult:
    """One target's int8 artifact and how it was made."""

    target: str
    int8_dir: Path
    fp32_size: int | None  # bytes of the fp32 artifact of the same target (None: not built)
    int8_size: int
    float_layers: list[str]  # what stayed float in this artifact, in words
    scheme: str  # how the int8 artifact was made
    runnable_here: bool = True  # False: the runtime needs another OS (Core ML on Linux)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def finish_int8(ctx: QuantContext, target: str, path: Path, fp32_size: int | None, tools: Sequence[str],
                scheme: str, float_layers: list[str], notes: list[str], extra: dict[str, Any] | None = None,
                export: dict[str, Any] | None = None, no_parity: str | None = None,
                result_extra: dict[str, Any] | None = None) -> TargetResult:
    """The int8 manifest (the `quantization` record with the target's `extra` fields, `export` metrics) and
    SDK parity with fp32 PyTorch on real photos (`ctx.spec("int8")` carries the int8 floors), unless
    `no_parity` says why not; `tools`: the packages whose versions it records. Every int8 graph is made from
    ctx.deploy()'s graph (or its fp32 export), so it has the same embedding output."""
    record = {"scheme": scheme, "float_layers": float_layers, "notes": notes,
              "calibration_images": ctx.calibration.source, "plan": ctx.plan.to_dict(),
              "always_float_ops": list(ALWAYS_FLOAT), **(extra or {})}
    metrics = {"quantization": record, **({"export": export} if export is not None else {})}
    m = finish_export(target, ctx.deploy(), path, ctx.spec("int8"), tool_versions(*tools), metrics, no_parity).manifest
    return TargetResult(target, path.parent, fp32_size, m.size_bytes, float_layers, scheme, no_parity is None, notes,
                        result_extra or {})


def fp32_artifact(ctx: QuantContext, target: str, out_dir: Path, model: torch.nn.Module | None = None) -> Artifact:
    """The fp32 export of a target through its converter (parity-checked like any export) in `<out_dir>/fp32/`,
    once per run (ExecuTorch's static and dynamic builds share it); of `model` (a bias-corrected copy: what a
    post-export quantizer, ONNX Runtime or coremltools, starts from) in `<out_dir>/fp32/<target>-bias-corrected/`."""
    if model is not None:
        return export_model(target, ctx.deploy(model), ctx.spec("fp32"), out_dir / "fp32" / f"{target}-bias-corrected")
    if target not in ctx.fp32_exports:
        ctx.fp32_exports[target] = export_model(target, ctx.deploy(), ctx.spec("fp32"), out_dir / "fp32" / target)
    return ctx.fp32_exports[target]


def prepare_context(checkpoint: str | Path, data: str, targets: Sequence[str], n_calibration: int = 300,
                    n_sensitivity: int = 200, eval_limit: int = 0, n_parity: int = 64,
                    log: Callable[[str], None] = print) -> QuantContext:
    """Load the checkpoint, decode the real photos, calibrate, measure the shifts of int8 weight rounding,
    choose the float families by measurement; the context of static activations."""
    from train.checkpoint import load_model, manifest_model_record

    from .recipes import resolve_recipes
    resolve_recipes(targets)  # an unknown target fails before any work
    model, cfg, tax, conf = load_model(checkpoint)
    size = cfg.image_size
    log(f"decoding real photos at {size} px (calibration {n_calibration}, sensitivity {n_sensitivity})")
    tc = conf.get("train", {})  # did training hold out the 20 % stratified slice (seed 0) int8 is judged on?
    held_out = ((Path(checkpoint) / "holdout.txt").is_file() and abs(float(tc.get("holdout_fraction", 0)) - 0.2) < 1e-9
                and int(tc.get("seed", 0)) == 0 and tc.get("train_split", "train") == "train")
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
