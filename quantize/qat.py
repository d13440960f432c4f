"""pt2e QAT fallback (`--qat-epochs N`): NOT IMPLEMENTED YET.

Planned: torch.export the DeployWrapper, `prepare_qat_pt2e` with the same layer-filtered XNNPACK /
litert quantizers (is_qat=True), fine-tune the unfrozen part (blocks >= freeze_blocks + head) with
`train.loop.hier_nll` on training photos, `convert_pt2e`, lower like PTQ, and copy the trained float
weights back for ONNX / Core ML. Until then the run records that QAT was requested and not done.
"""

from __future__ import annotations

from typing import Any

from ._common import QuantizeError


def run_qat(ctx, evals, fp32_lp, out, epochs: int, data: str) -> dict[str, Any]:
    raise QuantizeError(f"--qat-epochs {epochs}: pt2e QAT is not implemented yet (see quantize/qat.py); "
                        "the post-training results above stand")
