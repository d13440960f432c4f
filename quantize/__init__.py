"""int8 for every target (`python -m quantize`): real-photo calibration, measured float set, report.

Modules: calibration (real photos, decoded as the SDK decodes), sim (PyTorch simulation of the int8
scheme by block family), bias (bias correction of weight rounding), sensitivity (which families stay
float), prepare (everything the targets are made from), recipes (per-target settings), one module
per target (onnx, executorch, tflite, coreml), report, run (the pipeline).
"""

from ._common import QuantizeError
from .recipes import TARGETS, CoreMLRecipe, ExecuTorchRecipe, OnnxRecipe, TFLiteRecipe
from .run import quantize_checkpoint

__all__ = ["QuantizeError", "TARGETS", "quantize_checkpoint", "OnnxRecipe", "ExecuTorchRecipe", "TFLiteRecipe",
           "CoreMLRecipe"]
