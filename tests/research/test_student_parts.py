"""research/student_parts.py: the deployed part is what training evaluates; the parts add up to it."""

import numpy as np
import pytest
import torch

from train.checkpoint import load_model, save_model
from train.data import load_dataset
from train.loop import predict_logprobs
from train.metrics import compute_metrics
from train.models import ModelConfig, build_model


def test_parts_of_a_global_head_student(grocery_root, tmp_path):
    import research.student_parts as bp
    tax = load_dataset(str(grocery_root), "val").taxonomy
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=96, d_model=32, heads=2, global_head=True)
    model = build_model(tax, cfg, pretrained=True)
    with torch.no_grad():  # give the query read-out a say of its own
        for ro in model.head.readout:
            ro.weight.mul_(20)
    save_model(model, cfg, tax, tmp_path, {})
    _, ds, lps = bp.part_logprobs(str(tmp_path), str(grocery_root), "val", limit=40)
    loaded, _, _, _ = load_model(tmp_path)
    expect = predict_logprobs(loaded, ds, 96, progress=False)
    for lvl in range(tax.depth):  # the deployed part is what training evaluates and exports
        np.testing.assert_allclose(lps["deployed"][lvl], expect[lvl], atol=1e-5)
        # the two read-outs add up to it: log_softmax(log p_pooled + log p_queries) = log_softmax(g + q)
        both = torch.from_numpy(lps["pooled read-out"][lvl] + lps["queries + CAMP"][lvl])
        np.testing.assert_allclose(torch.log_softmax(both, -1).numpy(), expect[lvl], atol=1e-4)
        # and neither alone is it
        for part in ("pooled read-out", "queries + CAMP"):
            assert np.abs(lps[part][lvl] - expect[lvl]).max() > 1e-2
    res = bp.parts(str(tmp_path), str(grocery_root), "val", limit=40)
    m = compute_metrics(tax, expect, ds.labels())
    assert all(res["deployed"][k] == pytest.approx(m[k]) for k in bp.KEYS)


def test_refuses_a_model_without_a_pooled_readout(tiny_student_dir, grocery_root):
    import research.student_parts as bp
    with pytest.raises(SystemExit, match="global_head"):
        bp.parts(str(tiny_student_dir), str(grocery_root))
