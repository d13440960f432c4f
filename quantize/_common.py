"""What the per-target int8 modules share: the run context, the result record, the int8 manifest."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from converters import Artifact, ExportError, ExportSpec, export_model, finish_export
from sdk import Taxonomy

from .bias import bias_corrected
from .calibration import ImageSet
from .sensitivity import Plan
from .sim import ALWAYS_FLOAT, DynamicScheme, Family, Ranges, calibrate, dynamic_scheme, families

# int8 parity floor at export: a sanity check that the artifact is not broken. The bar (>= 98.5 % fine
# agreement, <= 0.5 pt fine top-1 loss, quantize.bar) is judged on the full evaluation sets in the report.
INT8_MIN_AGREEMENT = 0.95
# ... counted on the photos fp32 decides by at least this many nats: int8 moves a fine log-prob by up to
# about half a nat (0.62 on the shipped model's parity photos), so closer calls may flip without a fault
INT8_TIE_MARGIN = 0.25
# int8 embedding vs fp32 PyTorch: a floor that catches a broken output, not a quality bar (enrolled prototypes
# are made and compared through the same artifact, so a uniform int8 shift does not move a decision)
INT8_MIN_EMBEDDING_COSINE = 0.9
INT8_FLOORS = dict(min_agreement=INT8_MIN_AGREEMENT, max_abs_logprob=None, tie_margin=INT8_TIE_MARGIN,
                   min_embedding_cosine=INT8_MIN_EMBEDDING_COSINE)
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
    # the model int8 artifacts are made from: `model` with weight-rounding bias correction (quantize.bias)
    int8_model: torch.nn.Module | None = None
    # Core ML's own rounding shifts (round-to-nearest, no scale clamp): it rounds the fp32 weights itself
    coreml_shifts: dict[str, torch.Tensor] | None = None
    # fp32 exports by output directory, shared by the contexts of one run (they do not depend on the scheme)
    fp32_exports: dict[Path, Artifact] = field(default_factory=dict)
    # ExecuTorch's dynamic activation scheme, whose float layers the int8 model leaves unrounded
    # (None: static, calibrated int8 activations)
    dynamic: DynamicScheme | None = None
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

    def deploy(self, int8: bool = False) -> torch.nn.Module:
        """The uint8-in graph of the fp32 model, or (`int8`) of the model the int8 artifacts are made from."""
        from train.models import DeployWrapper
        return DeployWrapper(self.int8_model if int8 and self.int8_model is not None else self.model).eval()

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


def finish_int8(ctx: QuantContext, target: str, path: Path, fp32_size: int | None, versions: dict[str, str],
                scheme: str, float_layers: list[str], notes: list[str], extra: dict[str, Any] | None = None,
                export: dict[str, Any] | None = None, no_parity: str | None = None,
                result_extra: dict[str, Any] | None = None) -> TargetResult:
    """The int8 manifest (the `quantization` record with the target's `extra` fields, `export` metrics) and
    SDK parity with fp32 PyTorch on real photos (`ctx.spec("int8")` carries the int8 floors), unless
    `no_parity` says why not. Every int8 graph is made from ctx.deploy()'s graph (or its fp32 export), so
    it has the same embedding output."""
    record = {"scheme": scheme, "float_layers": float_layers, "notes": notes,
              "calibration_images": ctx.calibration.source, "plan": ctx.plan.to_dict(),
              "always_float_ops": list(ALWAYS_FLOAT), **(extra or {})}
    metrics = {"quantization": record, **({"export": export} if export is not None else {})}
    m = finish_export(target, ctx.deploy(), path, ctx.spec("int8"), versions, metrics, no_parity).manifest
    return TargetResult(target, path.parent, fp32_size, m.size_bytes, float_layers, scheme, no_parity is None, notes,
                        result_extra or {})


def fp32_artifact(ctx: QuantContext, target: str, out_dir: Path) -> Artifact:
    """The fp32 export of a target through its converter (parity-checked like any export), once per run
    and directory: ExecuTorch's static and dynamic builds share it."""
    if out_dir not in ctx.fp32_exports:
        ctx.fp32_exports[out_dir] = export_model(target, ctx.deploy(), ctx.spec("fp32"), out_dir)
    return ctx.fp32_exports[out_dir]


def int8_source_artifact(ctx: QuantContext, target: str, out_dir: Path, model: torch.nn.Module | None = None) -> Artifact:
    """The fp32 graph a post-export quantizer (ONNX Runtime, coremltools) starts from: the bias-corrected
    model's export (`model`, default `ctx.int8_model`) in `<out>/fp32/<target>-bias-corrected/`."""
    from train.models import DeployWrapper
    net = DeployWrapper(model).eval() if model is not None else ctx.deploy(int8=True)
    return export_model(target, net, ctx.spec("fp32"), out_dir.parent / f"{out_dir.name}-bias-corrected")
