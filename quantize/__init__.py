"""int8 for every target (`python -m quantize`): real-photo calibration, measured float set, report.

Modules: calibration (real photos, decoded as the SDK decodes), sim (PyTorch simulation of the int8
scheme by block family), sensitivity (which families stay float), one module per target (onnx,
executorch, tflite, coreml), qat (pt2e QAT fallback), report, run (the pipeline).
"""

from ._common import QuantizeError
from .run import TARGETS, quantize_checkpoint

__all__ = ["QuantizeError", "TARGETS", "quantize_checkpoint"]
