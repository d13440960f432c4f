"""Seed components (train/components.py): flat and HRN archs, TransFG part selection, Coarse2Fine
refinement, contrastive and angular asymmetric losses, mixed-granularity training with the tree loss."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.components import (angular_asymmetric_loss, attended_box, contrastive_loss, crop_resize,
                              token_saliency)
from train.data import synthetic_taxonomy
from train.losses import LossContext, get_loss, list_losses
from train.models import DeployWrapper, ModelConfig, build_model, list_archs

TAX = synthetic_taxonomy()  # sizes (2, 4, 8)
SIZE = 96


def _model(pretrained=False, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=SIZE, d_model=32, heads=2, **kw)
    return build_model(TAX, cfg, pretrained=pretrained).eval()


def _images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g)


def test_everything_is_registered():
    assert {"flat", "hrn"} <= set(list_archs())
    assert {"contrastive", "aal", "tree", "fine_ce", "global_ce"} <= set(list_losses())


# ---- flat ---------------------------------------------------------------------------------------
def test_flat_coarse_levels_are_tree_sums_of_fine_probabilities():
    m = _model(arch="flat")
    aux: dict = {}
    lps = m(_images(), aux=aux)
    assert [lp.shape[1] for lp in lps] == list(TAX.sizes)
    assert set(aux) >= {"pooled", "fine_features", "logits"}
    fine = lps[-1].exp()
    anc = TAX.ancestor_matrix()
    for lvl in range(TAX.depth - 1):
        expect = torch.zeros(fine.shape[0], TAX.sizes[lvl])
        for leaf, a in enumerate(anc):
            expect[:, a[lvl]] += fine[:, leaf]
        torch.testing.assert_close(lps[lvl].exp(), expect, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lps[-1], F.log_softmax(aux["logits"][-1], -1))


def test_flat_tree_marginals_stay_finite_for_hopeless_nodes():
    m = _model(arch="flat")
    fine = torch.full((1, 8), -1e4)
    fine[0, 0] = 0.0
    lps = m.tree(F.log_softmax(fine, -1))
    assert all(torch.isfinite(lp).all() for lp in lps)
    assert float(lps[0][0, 0].exp()) == pytest.approx(1.0)


@pytest.mark.parametrize("arch", ["flat", "hrn"])
def test_pooled_archs_run_from_a_cached_prefix_like_the_query_models(arch):
    m = _model(arch=arch)
    assert m.backbone._fc is None and m.cfg.arch == arch and m.taxonomy == TAX
    x = _images()
    with torch.no_grad():
        full = m.forward(x)
        n = 11
        prefix = m.backbone.prefix(x, n)
        part = m.forward_from(prefix[n - 1], n, cached={})
    for a, b in zip(full, part):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _onnx_roundtrip(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    wrapper = DeployWrapper(model).eval()
    path = tmp_path / "m.onnx"
    example = torch.zeros(2, SIZE, SIZE, 3, dtype=torch.uint8)
    torch.onnx.export(wrapper, (example,), str(path), input_names=["image"], opset_version=17, dynamo=False,
                      dynamic_axes={"image": {0: "batch"}})
    img = torch.randint(0, 256, (3, SIZE, SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = wrapper(img)
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": img.numpy()})
    assert len(out) == TAX.depth + 1  # the levels, then the embedding
    for a, b in zip(ref, out):
        np.testing.assert_allclose(a.numpy(), b, atol=2e-3)


def test_flat_exports_to_onnx_with_the_same_outputs(tmp_path):
    _onnx_roundtrip(_model(arch="flat"), tmp_path)


# ---- HRN ----------------------------------------------------------------------------------------
def test_hrn_child_levels_use_parent_features():
    m = _model(arch="hrn")
    x = _images()
    aux: dict = {}
    lps = m(x, aux=aux)
    assert [lp.shape[1] for lp in lps] == list(TAX.sizes)
    assert len(aux["level_features"]) == TAX.depth
    for lp in lps:
        torch.testing.assert_close(lp.exp().sum(1), torch.ones(3))
    # the fine loss reaches the coarsest granularity-specific block only through the residual links
    get_loss("fine_ce")(LossContext(m, lps, torch.tensor([[0, 0, 0]] * 3), aux, TAX)).backward()
    assert m.blocks[0][0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in m.parent_proj.parameters():
            p.zero_()
        after = m(x)
    torch.testing.assert_close(after[0], lps[0].detach())  # the top level has no parent
    assert not torch.allclose(after[-1], lps[-1].detach())


def test_hrn_with_tree_and_fine_ce_fits_a_batch():
    m = _model(arch="hrn").train()
    for p in m.backbone.parameters():
        p.requires_grad_(False)
    x = _images(4)
    y = torch.tensor([[0, 0, 0], [0, 1, 3], [1, 2, 4], [1, 3, -1]])  # last row: coarse only
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        aux: dict = {}
        lps = m(x, aux=aux)
        ctx = LossContext(m, lps, y, aux, TAX)
        loss = get_loss("tree")(ctx) + get_loss("fine_ce")(ctx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


# ---- contrastive ----------------------------------------------------------------------------------
def test_contrastive_loss_matches_hand_computation():
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [3.0, 0.0]])
    y = torch.tensor([[0, 0, 0], [0, 0, 1], [1, 2, 4], [0, 0, 0]])
    z = F.normalize(f, dim=-1)
    total, n = 0.0, 0
    for i, j in itertools.permutations(range(4), 2):
        cos = float(z[i] @ z[j])
        total += (1 - cos) if y[i, -1] == y[j, -1] else max(cos - 0.4, 0.0)
        n += 1
    assert float(contrastive_loss(f, y)) == pytest.approx(total / n, rel=1e-6)


def test_contrastive_loss_compares_mixed_labels_at_their_common_level():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # row 1 is labelled only at the coarse level, under row 0's coarse node; row 2 has no labels at all
    y = torch.tensor([[0, 1, 2], [0, 1, -1], [-1, -1, -1]])
    assert float(contrastive_loss(f, y)) == pytest.approx(1.0)  # one same-class pair, cos 0, both orders
    y2 = torch.tensor([[0, 1, 2], [0, 0, -1], [-1, -1, -1]])
    assert float(contrastive_loss(f, y2)) == pytest.approx(0.0)  # different coarse, cos 0 < 0.4


def test_contrastive_loss_trains_pooled_features():
    m = _model()
    aux: dict = {}
    lps = m(_images(), aux=aux)
    loss = get_loss("contrastive")(LossContext(m, lps, torch.tensor([[0, 0, 0], [0, 0, 0], [0, 0, 1]]), aux, TAX))
    loss.backward()
    assert float(loss) > 0 and m.tokens.proj[0].weight.grad.abs().sum() > 0


# ---- angular asymmetric loss ---------------------------------------------------------------------
def test_aal_matches_hand_computation_and_clips_easy_negatives():
    cos = torch.tensor([[0.9, 0.1, -0.8], [0.2, 0.5, 0.3], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, -1])
    s, clip = 7.0, 0.05

    def sig(v):
        return 1 / (1 + math.exp(-v))

    expect = 0.0
    for i in range(2):
        for c in range(3):
            p = sig(s * float(cos[i, c]))
            if c == int(y[i]):
                expect += -math.log(p)  # gamma+ = 0
            else:
                pm = max(p - clip, 0.0)
                expect += -pm * math.log(1 - pm)  # gamma- = 1
    assert float(angular_asymmetric_loss(cos, y)) == pytest.approx(expect / 2, rel=1e-5)
    # p(s * -0.8) = 0.0037 < clip: that negative costs nothing
    only = angular_asymmetric_loss(torch.tensor([[0.9, -0.8]]), torch.tensor([0]))
    assert float(only) == pytest.approx(-math.log(sig(6.3)), rel=1e-5)


@pytest.mark.parametrize("kw", [{}, {"arch": "flat"}, {"arch": "hrn"}])
def test_aal_on_every_arch_uses_normalized_class_weights(kw):
    m = _model(**kw)
    aux: dict = {}
    lps = m(_images(), aux=aux)
    from train.components import fine_cosines
    ctx = LossContext(m, lps, torch.tensor([[0, 0, 0], [1, 2, 5], [1, 2, -1]]), aux, TAX)
    cos = fine_cosines(ctx)
    assert cos.shape == (3, 8) and float(cos.abs().max()) <= 1 + 1e-5
    loss = get_loss("aal")(ctx)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    w = m.head.readout[-1].weight if "arch" not in kw else m.fine_classifier.weight
    assert w.grad is not None and w.grad.abs().sum() > 0


# ---- TransFG part selection ----------------------------------------------------------------------
def test_one_level_step_reproduces_the_head():
    m = _model()
    aux: dict = {}
    with torch.no_grad():
        lps = m(_images(), aux=aux)
        _, logits = m.head.level(TAX.depth - 1, aux["tokens"], aux["queries"], lps)
    torch.testing.assert_close(logits, aux["logits"][-1])


def test_part_selection_second_look_over_selected_tokens():
    x = _images()
    base = _model()
    aux: dict = {}
    with torch.no_grad():
        base(x, aux=aux)
    n_tokens = aux["tokens"].shape[1]
    # selecting every token: the query cross attention has no positions, so the second look equals
    # the first and the output equals the plain model with the same weights
    every = _model(part_select=n_tokens)
    every.load_state_dict(base.state_dict())
    few = _model(part_select=3)
    few.load_state_dict(base.state_dict())
    with torch.no_grad():
        ref = base(x)
        for a, b in zip(every(x), ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    aux = {}
    out = few(x, aux=aux)
    assert aux["part_index"].shape == (3, 3)
    with torch.no_grad():
        first = base(x, aux=(base_aux := {}))
    # fine logits = mean of the first look's and the second look's
    torch.testing.assert_close(aux["logits"][-1], 0.5 * (base_aux["logits"][-1] + aux["part_logits"]))
    torch.testing.assert_close(out[-1], F.log_softmax(aux["logits"][-1], -1))
    torch.testing.assert_close(out[0], first[0])  # coarser levels untouched
    assert not torch.allclose(out[-1], ref[-1])
    # the second look is differentiable with respect to the selected tokens (index gather)
    few.zero_grad()
    aux["part_logits"][:, 0].sum().backward()
    assert few.tokens.proj[-1].weight.grad.abs().sum() > 0


def test_token_saliency_weights_queries_by_predicted_probability():
    attn = torch.zeros(1, 2, 3, 4)
    attn[0, :, 0, 1] = 1.0  # class 0 looks at token 1
    attn[0, :, 2, 3] = 1.0  # class 2 looks at token 3
    lp = torch.log(torch.tensor([[0.9, 0.05, 0.05]]))
    assert int(token_saliency(attn, lp).argmax()) == 1
    lp = torch.log(torch.tensor([[0.05, 0.05, 0.9]]))
    assert int(token_saliency(attn, lp).argmax()) == 3


# ---- Coarse2Fine ----------------------------------------------------------------------------------
def test_attended_box_is_the_bounding_box_above_mean():
    sal = torch.zeros(2, 4, 6)
    sal[0, 1:3, 2:5] = 1.0
    sal[1] = 1.0  # flat saliency: the whole grid
    box = attended_box(sal.flatten(1), 4, 6)
    torch.testing.assert_close(box, torch.tensor([[0.25, 0.75, 2 / 6, 5 / 6], [0.0, 1.0, 0.0, 1.0]]))


def test_crop_resize_identity_and_bilinear_sampling():
    x = torch.randn(2, 3, 8, 10)
    full = torch.tensor([[0.0, 1.0, 0.0, 1.0]] * 2)
    torch.testing.assert_close(crop_resize(x, full), x, atol=1e-5, rtol=1e-5)
    # a ramp shows the sampling positions: the top half stretched to 8 rows samples rows 0.5 i - 0.25
    ramp = torch.arange(8.0)[None, None, :, None].expand(1, 1, 8, 4)
    out = crop_resize(ramp, torch.tensor([[0.0, 0.5, 0.0, 1.0]]))
    expect = (0.5 * torch.arange(8.0) - 0.25).clamp(0, 7)
    torch.testing.assert_close(out[0, 0, :, 0], expect)
    # matches F.interpolate (align_corners=False) away from the crop border
    ref = F.interpolate(x[:, :, :4, :], size=(8, 10), mode="bilinear", align_corners=False)
    half = torch.tensor([[0.0, 0.5, 0.0, 1.0]] * 2)
    torch.testing.assert_close(crop_resize(x, half)[:, :, :7], ref[:, :, :7], atol=1e-5, rtol=1e-5)


def test_c2f_orthogonal_init_and_combination():
    m = _model(c2f_refine=True)
    w = m.head.cross[-1][-1].attn.q.weight
    torch.testing.assert_close(w @ w.T, torch.eye(w.shape[0]), atol=1e-5, rtol=1e-5)
    aux: dict = {}
    x = _images()
    out = m(x, aux=aux)
    box = aux["c2f_box"]
    assert box.shape == (3, 4) and (box[:, 1] > box[:, 0]).all() and (box[:, 3] > box[:, 2]).all()
    first = F.log_softmax(aux["logits"][-1], -1)
    torch.testing.assert_close(out[-1], F.log_softmax(0.5 * (first + aux["c2f_logps"][-1]), -1))
    out[-1][:, 0].sum().backward()
    assert m.head.queries[-1].grad.abs().sum() > 0


def test_c2f_crops_the_cached_prefix_when_training_from_block_n():
    m = _model(c2f_refine=True, part_select=4, taps=(5, 10, -1))
    x = _images()
    n = 11  # blocks 0..10 frozen: tap 5 comes from the cache, tap 10 is the input itself
    with torch.no_grad():
        pre = m.backbone.prefix(x, n, (5,))
        aux: dict = {}
        out = m.forward_from(pre[n - 1], n, cached={5: pre[5]}, aux=aux)
        full_aux: dict = {}
        m(x, aux=full_aux)
    for a in out:
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.exp().sum(1), torch.ones(3))
    # same first look and attended box as from the image (the second look differs: it crops the
    # block-10 features and tap 5 instead of the raw image)
    torch.testing.assert_close(aux["logits"][0], full_aux["logits"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(aux["c2f_box"], full_aux["c2f_box"])
    assert aux["c2f_logps"][-1].shape == (3, 8)


def test_c2f_crop_block_makes_deployment_crop_what_training_cropped():
    # training from a cached prefix of 11 blocks crops block 10's output; with c2f_crop_block=11 the
    # full forward from the image (evaluation, exported graph) crops the same features
    m = _model(True, c2f_refine=True, part_select=4, taps=(5, 10, -1), c2f_crop_block=11)
    x = _images()
    with torch.no_grad():
        pre = m.backbone.prefix(x, 11, (5,))
        trained = m.forward_from(pre[10], 11, cached={5: pre[5]})
        deployed = m(x, aux=(dep_aux := {}))
        other = _model(True, c2f_refine=True, part_select=4, taps=(5, 10, -1))  # crops the raw image instead
        other.load_state_dict(m.state_dict())
        other(x, aux=(raw_aux := {}))
    for a, b in zip(trained, deployed):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(raw_aux["c2f_box"], dep_aux["c2f_box"])
    cropped = (dep_aux["c2f_box"] != torch.tensor([0.0, 1.0, 0.0, 1.0])).any(1)
    assert cropped.any(), "no image got a partial box; pick other test images"
    # where the box is partial, cropping the image and cropping block 10's features see different tokens
    diff = raw_aux["c2f_aux"]["tokens"][cropped] - dep_aux["c2f_aux"]["tokens"][cropped]
    assert diff.abs().max() > 1e-2


@pytest.mark.parametrize("crop_block", [0, 11])
def test_refined_query_model_exports_to_onnx(tmp_path, crop_block):
    _onnx_roundtrip(_model(part_select=6, c2f_refine=True, c2f_crop_block=crop_block), tmp_path)


# ---- mixed granularity ---------------------------------------------------------------------------
def test_global_ce_supervises_the_flat_readout_alone():
    m = _model(global_head=True).train()
    aux: dict = {}
    logps = m(_images(), aux=aux)
    y = torch.tensor([[0, 1, 2], [1, 2, 5], [1, 3, -1]])  # the last row is unlabelled at the finest level
    loss = get_loss("global_ce")(LossContext(m, logps, y, aux, TAX, smoothing=0.0))
    expect = 0.0
    for lvl, g in enumerate(aux["global_logits"]):
        rows = [i for i in range(3) if y[i, lvl] >= 0]
        expect += float(sum(-F.log_softmax(g[i], -1)[y[i, lvl]] for i in rows)) / len(rows)
    assert float(loss) == pytest.approx(expect, rel=1e-5)
    # it differs from `ce` on the model's output (query read-out + global logits) ...
    assert abs(float(loss) - float(get_loss("ce")(LossContext(m, logps, y, aux, TAX, smoothing=0.0)))) > 1e-3
    # ... and trains the pooled read-out, not the query heads
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.global_head.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.head.parameters())
    with pytest.raises(ValueError, match="global_head"):
        get_loss("global_ce")(LossContext(m, logps, y, {}, TAX))


def test_tree_loss_on_coarse_only_rows_is_minus_log_node_marginal():
    g = torch.Generator().manual_seed(3)
    logps = [F.log_softmax(torch.randn(2, n, generator=g), -1) for n in TAX.sizes]
    y = torch.tensor([[1, 2, -1], [0, -1, -1]])  # coarse-only, category-only
    loss = get_loss("tree")(LossContext(None, logps, y, {}, TAX))
    anc = TAX.ancestor_matrix()
    expect = []
    for i, (lvl, node) in enumerate([(1, 2), (0, 0)]):
        scores = [math.exp(sum(float(logps[l][i, a[l]]) for l in range(TAX.depth))) for a in anc]
        marginal = sum(s for s, a in zip(scores, anc) if a[lvl] == node) / sum(scores)
        expect.append(-math.log(marginal))
    assert float(loss) == pytest.approx(sum(expect) / 2, rel=1e-5)


def _tiny_train(grocery_root, tmp_path, mc: ModelConfig, **tc_kw):
    from train.loop import TrainConfig, train_model
    # the settings of tests/train/test_resume.py, so the frozen-feature cache is shared
    tc = TrainConfig(data=str(grocery_root), epochs=1, batch_size=32, limit_per_class=2, limit_val=16,
                     cache_views=1, freeze_blocks=11, lr=3e-3, threads=1, **tc_kw)
    return train_model(mc, tc, tmp_path / "run", log=lambda *_: None)


@pytest.mark.slow
def test_mixed_granularity_training_with_tree_loss(grocery_root, tmp_path):
    mc = ModelConfig(image_size=96, d_model=32, heads=2)
    metrics = _tiny_train(grocery_root, tmp_path, mc, relabel_ratio=0.5, losses="ce,tree")
    assert 0.0 <= metrics["val"]["top1/fine"] <= 1.0
    hist = json.loads((tmp_path / "run" / "config.json").read_text())["history"]
    assert math.isfinite(hist[-1]["loss"])
    labels = json.loads((tmp_path / "run" / "config.resolved.json").read_text())["train"]
    assert labels["relabel_ratio"] == 0.5


@pytest.mark.slow
@pytest.mark.parametrize("arch,extra,losses", [
    ("flat", {}, "fine_ce,contrastive,aal"),
    ("hrn", {}, "tree,fine_ce"),
    ("hsq_student", {"part_select": 8, "c2f_refine": True, "c2f_crop_block": 11}, "ce,tree,contrastive,aal"),
])
def test_components_train_with_the_cached_loop_and_reload(grocery_root, tmp_path, arch, extra, losses):
    from train.checkpoint import load_model
    mc = ModelConfig(arch=arch, image_size=96, d_model=32, heads=2, **extra)
    metrics = _tiny_train(grocery_root, tmp_path, mc, losses=losses)
    assert math.isfinite(metrics["val"]["top1/fine"])
    model, cfg, tax, _ = load_model(tmp_path / "run")
    assert cfg == mc
    with torch.no_grad():
        lps = model(torch.zeros(1, 3, 96, 96))
    assert [lp.shape[1] for lp in lps] == list(tax.sizes)


def test_cli_exposes_the_component_options(monkeypatch, tmp_path):
    import train.__main__ as cli
    import train.loop
    seen = {}
    monkeypatch.setattr(train.loop, "train_model", lambda mc, tc, out, resume=False: seen.update(mc=mc, tc=tc))
    cli.main(["teacher", "--out", str(tmp_path), "--arch", "flat", "--part-select", "8", "--c2f-refine", "true",
              "--losses", "ce,tree,contrastive,aal", "--relabel-ratio", "0.5"])
    assert seen["mc"].arch == "flat" and seen["mc"].part_select == 8 and seen["mc"].c2f_refine is True
    assert seen["tc"].losses == "ce,tree,contrastive,aal" and seen["tc"].relabel_ratio == 0.5


def test_cli_refuses_global_ce_with_a_refined_forward(monkeypatch, tmp_path, capsys):
    """The shipped student recipe (global_head + global_ce) plus part selection: a usage error before training,
    not a failure in the first training step."""
    import train.__main__ as cli
    import train.loop
    called = []
    monkeypatch.setattr(train.loop, "train_model", lambda *a, **k: called.append(a))
    config = Path(__file__).resolve().parents[2] / "configs" / "student.yaml"
    assert cli.main(["student", "--config", str(config), "--out", str(tmp_path), "--part-select", "8"]) == 2
    assert "global_ce" in capsys.readouterr().err and not called
    assert cli.main(["student", "--config", str(config), "--out", str(tmp_path), "--part-select", "8",
                     "--losses", "ce,tree"]) == 0
    assert len(called) == 1


def test_train_model_refuses_global_ce_with_a_refined_forward(tmp_path):
    from train.loop import TrainConfig, train_model
    mc = ModelConfig(image_size=SIZE, d_model=32, heads=2, global_head=True, c2f_refine=True)
    with pytest.raises(ValueError, match="global_ce"):
        train_model(mc, TrainConfig(losses="ce, global_ce"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
