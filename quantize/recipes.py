"""How each target is quantized: one small recipe per target, validated when it is made.

`python -m quantize` maps its per-target flags onto these; `quantize_checkpoint(recipes=...)` takes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._common import QuantizeError

TARGETS = ("onnx", "executorch", "tflite", "coreml")
ACTIVATIONS = ("auto", "static", "dynamic")


@dataclass(frozen=True)
class OnnxRecipe:
    """onnxruntime `quantize_static`, QDQ, U8 activations / S8 weights per channel, MinMax calibration;
    nothing to choose (docs/results.md, ONNX: no calibration method or weight range did better)."""


@dataclass(frozen=True)
class ExecuTorchRecipe:
    """pt2e XNNPACK quantizer, fully delegated. `activations`: calibrated int8 (static), quantized per
    photo at run time (dynamic), or auto: both built, judged and timed, the fastest that meets the int8
    bar kept (`quantize.run.pick_fastest`)."""

    activations: str = "auto"

    def __post_init__(self):
        if self.activations not in ACTIVATIONS:
            raise QuantizeError(f"unknown ExecuTorch activations {self.activations!r}; choose from {', '.join(ACTIVATIONS)}")


@dataclass(frozen=True)
class TFLiteRecipe:
    """litert-torch PT2E quantizer: full-integer, uint8 image in; nothing to choose."""


@dataclass(frozen=True)
class CoreMLRecipe:
    """coremltools `linear_quantize_weights`: int8 weights per channel, float activations."""

    weight_threshold: int = 2048  # weights with at most this many elements stay float (coremltools' default)

    def __post_init__(self):
        if self.weight_threshold < 0:
            raise QuantizeError(f"Core ML weight_threshold must be >= 0 (got {self.weight_threshold})")


RECIPES = {"onnx": OnnxRecipe, "executorch": ExecuTorchRecipe, "tflite": TFLiteRecipe, "coreml": CoreMLRecipe}


def resolve_recipes(targets, recipes: dict | None = None) -> dict:
    """Every target's recipe (the default where none is given); QuantizeError on an unknown target or a
    recipe of the wrong kind."""
    recipes = dict(recipes or {})
    bad = [t for t in [*targets, *recipes] if t not in TARGETS]
    if bad:
        raise QuantizeError(f"unknown target(s) {sorted(set(bad))}; targets: {', '.join(TARGETS)}")
    for t, r in recipes.items():
        if not isinstance(r, RECIPES[t]):
            raise QuantizeError(f"{t}: expected a {RECIPES[t].__name__}, got {type(r).__name__}")
    return {t: recipes.get(t) or RECIPES[t]() for t in targets}
