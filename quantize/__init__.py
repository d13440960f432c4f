"""int8 for every target (`python -m quantize`): real-photo calibration, a measured float plan, bias
correction, one module per target, a report; `run` is the pipeline.
"""

from ._common import QuantizeError
from .recipes import TARGETS, CoreMLRecipe, ExecuTorchRecipe, OnnxRecipe, TFLiteRecipe
from .run import quantize_checkpoint

__all__ = ["QuantizeError", "TARGETS", "quantize_checkpoint", "OnnxRecipe", "ExecuTorchRecipe", "TFLiteRecipe",
           "CoreMLRecipe"]
