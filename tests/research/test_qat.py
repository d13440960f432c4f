"""research.qat on a real tiny student and real Grocery photos: forced QAT for ExecuTorch and TFLite."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdk import Classifier, Manifest


def test_accuracy_misses_names_the_failing_split():
    from research.qat import accuracy_misses

    def split(drop, agr):
        return {"fine_top1_drop": drop, "agreement_with_fp32": {"agreement/fine": agr}}

    ok = {"splits": {"val": split(0.0, 1.0), "train20": split(0.005, 0.99)}}
    assert accuracy_misses(ok, "fine", 0.005, 0.99) == []
    bad = {"splits": {"val": split(0.0, 1.0), "train20": split(0.02, 0.97)}}
    why = accuracy_misses(bad, "fine", 0.005, 0.99)
    assert len(why) == 2 and all(w.startswith("train20:") for w in why)


def test_trainable_parameters_follow_the_frozen_prefix():
    from research.qat import _trainable

    assert not _trainable("model.backbone._conv_stem.weight", 3)
    assert not _trainable("model.backbone._blocks.2._expand_conv.weight", 3)
    assert _trainable("model.backbone._blocks.3._expand_conv.weight", 3)
    assert not _trainable("model.backbone._blocks.5._bn1.weight", 3)
    assert _trainable("model.backbone._conv_head.weight", 3)
    assert _trainable("model.head.cross.0.0.attn.q.weight", 3)
    # nothing frozen (--qat-freeze-blocks 0): the stem and every block train, BatchNorm still does not
    assert _trainable("model.backbone._conv_stem.weight", 0)
    assert _trainable("model.backbone._blocks.0._depthwise_conv.weight", 0)
    assert not _trainable("model.backbone._blocks.0._bn1.weight", 0)


def test_qat_config_rejects_zero_epochs():
    from research.qat import QATConfig

    with pytest.raises(ValueError, match="at least one epoch"):
        QATConfig(epochs=0)
    with pytest.raises(ValueError, match="choose from ptq, minmax"):
        QATConfig(epochs=1, ranges="histogram")


@pytest.mark.slow
def test_training_photos_exclude_the_judging_slice(grocery_root, tiny_student_dir):
    from research.qat import training_set
    from sdk import Taxonomy, prepare
    from train.data import load_dataset, stratified_holdout

    tax = Taxonomy.load(tiny_student_dir / "taxonomy.json")
    photos = training_set(str(grocery_root), 64, tax, n=20)
    assert photos.images.shape == (20, 64, 64, 3) and photos.images.dtype == np.uint8
    ds = load_dataset(str(grocery_root), "train", taxonomy=tax)
    _, hold = stratified_holdout(ds, 0.2, seed=0)
    classes = {int(l) for l in photos.labels[:, -1]}
    held = [prepare(ds.samples[i].source, 64) for i in hold if ds.samples[i].labels[-1] in classes]
    assert held and not any(np.array_equal(h, p) for h in held for p in photos.images)
    assert len({int(l) for l in photos.labels[:, -1]}) == 20  # spread over classes


@pytest.mark.slow
def test_forced_qat_artifacts_load_through_the_sdk(qat_run, grocery_root):
    rep, tmp_path = qat_run  # the int8 run with `--epochs 1 --force` (tests/research/conftest.py)
    saved = json.loads((tmp_path / "report.json").read_text())
    md = (tmp_path / "report.md").read_text()
    assert "## QAT vs post-training int8" in md
    for t in ("executorch", "tflite"):
        rec = rep["targets"][f"{t}_qat"]
        assert "error" not in rec, f"{t} QAT: {rec.get('error')}\n{rec.get('traceback')}"
        assert saved["targets"][f"{t}_qat"]["qat"]["epochs"] == 1
        assert rec["qat"]["n_images"] == 40 and rec["qat"]["history"][0]["steps"] == 5
        assert rec["qat"]["trainable_params"] > 0
        assert set(rec["ptq"]) == set(rec["splits"]) == {"val", "train20"}
        d = tmp_path / "qat" / t
        m = Manifest.load(d)
        assert m.precision == "int8"
        assert m.metrics["qat"]["epochs"] == 1 and m.metrics["quantization"]["qat"]["n_images"] == 40
        assert m.metrics["int8_evaluation"]["target"] == f"{t}_qat"
        assert rec["size_ratio"] < 0.5  # still an int8 file
        # the tiny student is barely trained (flat distributions, easy to flip): 90 %, as for PTQ
        agr = rec["splits"]["val"]["agreement_with_fp32"]["agreement/fine"]
        assert agr >= 0.90, f"{t} QAT: fine agreement with fp32 {agr}"
        assert f"| {t} | val |" in md
        # same SDK call path as every artifact, no code change
        pred = Classifier.load(d).classify(grocery_root / "train/Fruit/Banana/Banana_001.jpg")
        assert pred.full_path
    # QAT leaves the post-training artifacts and their records alone
    assert Manifest.load(tmp_path / "executorch").metrics["quantization"].get("qat") is None
    assert "error" not in rep["targets"]["executorch"]


def test_onnx_reports_qat_unavailable(tmp_path):
    """A target without a pt2e path gets a record saying so and which float sets were tried."""
    from research.qat import QATConfig, run_qat
    from quantize.sensitivity import Plan

    class Ctx:  # run_qat only reads the plan and the taxonomy for a target it cannot QAT
        plan = Plan(["a"], ["b"], {}, steps=[{"float": ["b"], "fine_agreement": 0.9, "fine_top1_drop": 0.02}])
        taxonomy = type("T", (), {"level_names": ["category", "coarse", "fine"]})()
        log = staticmethod(lambda *_: None)

    rec = {"splits": {"val": {"fine_top1_drop": 0.02, "agreement_with_fp32": {"agreement/fine": 0.95}}}}
    out = run_qat(Ctx(), {"onnx": rec}, tmp_path, "no data needed", QATConfig(epochs=1),
                  judge=lambda r, c: pytest.fail("nothing to judge"), max_top1_drop=0.005, min_agreement=0.99)
    assert out["onnx_qat"]["skipped"] and "not available" in out["onnx_qat"]["reason"]
    assert out["onnx_qat"]["float_families_tried"] == [["b"]]


def test_qat_augmentation_keeps_the_deployed_input_type_and_varies():
    import numpy as np
    import torch

    from research.qat import augment_batch

    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8))
    a = augment_batch(x, np.random.default_rng(1))
    b = augment_batch(x, np.random.default_rng(2))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert not torch.equal(a, b) and not torch.equal(a, x)
    # a full-area crop without flip is the identity
    same = augment_batch(x, np.random.default_rng(3), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for i in range(3):
        assert torch.equal(same[i], x[i]) or torch.equal(same[i], x[i].flip(1))


def test_qat_with_post_training_ranges_starts_from_the_post_training_graph(tiny_student_dir, grocery_root):
    """`--qat-ranges ptq` (the default): before any training step the fake-quantized QAT graph computes
    what the post-training pt2e graph computes (same histogram activation ranges, frozen), so QAT can only
    start from where PTQ is. The min/max start (`--qat-ranges minmax`) is measurably elsewhere."""
    from quantize._common import QuantContext
    from quantize.calibration import calibration_sets, evaluation_sets
    from quantize.executorch import convert, quantized_module_names, xnnpack_quantizer
    from research.qat import _activation_observers, prepare
    from quantize.sensitivity import Plan
    from quantize.sim import families
    from train.checkpoint import load_model

    model, cfg, tax, _ = load_model(tiny_student_dir)
    cal, _ = calibration_sets(str(grocery_root), cfg.image_size, tax, 24, 8)
    judge = evaluation_sets(str(grocery_root), cfg.image_size, tax, limit=16)["val"]
    plan = Plan(quantized=[f.name for f in families(model)], float_families=[], single={})
    ctx = QuantContext(model, tax, cfg.image_size, cal, judge, plan, ranges=None, log=lambda *_: None)
    names = quantized_module_names(ctx)
    x = torch.from_numpy(np.ascontiguousarray(judge.images))
    with torch.no_grad():
        converted = convert(ctx, xnnpack_quantizer(names))  # exported with batch 1
        per_photo = [converted(x[i:i + 1]) for i in range(len(x))]
        ptq = [torch.cat([o[lvl] for o in per_photo]).exp() for lvl in range(len(per_photo[0]))]
        gaps = {}
        for ranges in ("ptq", "minmax"):
            qat = prepare(ctx, lambda is_qat: xnnpack_quantizer(names, is_qat=is_qat), ranges)
            fqs = [getattr(qat, n.target) for n in _activation_observers(qat)]
            before = [fq.calculate_qparams()[0].clone() for fq in fqs]  # what convert_pt2e will write
            per_photo = [qat(x[i:i + 1]) for i in range(len(x))]  # as the post-training graph runs
            out = [torch.cat([o[lvl] for o in per_photo]).exp() for lvl in range(len(per_photo[0]))]
            gaps[ranges] = float(np.mean([float((a - b).abs().mean()) for a, b in zip(ptq, out)]))
            if ranges == "ptq":  # the ranges stay where post-training put them while photos pass
                assert all(fq.observer_enabled[0] == 0 for fq in fqs)
                assert all(torch.equal(b, fq.calculate_qparams()[0]) for b, fq in zip(before, fqs))
    assert len(fqs) > 20
    # mean |Δ probability| over photos, classes and levels: none (measured: exactly 0) when QAT starts
    # from the post-training ranges; 1.3e-3 from min/max ranges
    assert gaps["ptq"] < 1e-6, gaps
    assert gaps["minmax"] > 1e-4, gaps


def test_qat_is_not_run_on_a_dynamic_artifact(tmp_path):
    """QAT trains the static scheme's calibrated ranges: an ExecuTorch artifact whose activations are
    quantized per photo at run time gets a record saying so, and no QAT."""
    from research.qat import QATConfig, run_qat
    from quantize.sensitivity import Plan

    class Ctx:
        plan = Plan(["a"], ["b"], {}, steps=[])
        taxonomy = type("T", (), {"level_names": ["category", "coarse", "fine"]})()
        log = staticmethod(lambda *_: None)
        dynamic = object()  # a DynamicScheme: the artifact quantizes its activations per photo

    rec = {"splits": {"val": {"fine_top1_drop": 0.0, "agreement_with_fp32": {"agreement/fine": 1.0}}}}
    out = run_qat(Ctx(), {"executorch": rec}, tmp_path, "no data needed", QATConfig(epochs=1, force=True),
                  judge=lambda r, c: pytest.fail("nothing to judge"), max_top1_drop=0.005, min_agreement=0.99)
    assert out["executorch_qat"]["skipped"] and "dynamic" in out["executorch_qat"]["reason"]
