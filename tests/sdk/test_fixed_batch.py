"""Backends whose artifact takes one batch size (TFLite, ExecuTorch, Core ML) answer any batch size."""

from __future__ import annotations

import numpy as np
import pytest

from sdk._backends import run_in_fixed_batches


@pytest.mark.parametrize("n", [1, 3, 4, 9])
def test_any_batch_is_split_padded_and_trimmed(n):
    seen = []

    def run_one(b):
        seen.append(b.shape[0])
        return [b.reshape(b.shape[0], -1).astype(np.float64).sum(1, keepdims=True), np.full((b.shape[0], 2), 7.0)]

    x = np.random.default_rng(n).integers(0, 256, (n, 2, 2, 3), dtype=np.uint8)
    out = run_in_fixed_batches(run_one, x, 4)
    assert set(seen) == {4}  # the runtime only ever sees its fixed batch
    assert [o.shape for o in out] == [(n, 1), (n, 2)]
    np.testing.assert_array_equal(out[0][:, 0], x.reshape(n, -1).astype(np.float64).sum(1))
