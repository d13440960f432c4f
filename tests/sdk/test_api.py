"""Classifier API: back-off thresholds, allow / deny lists, unknown flag, JSON, calibration maths."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdk import Classifier, HierarchicalPrediction, TaxonomyError, TreeDecoder
from sdk import _calibrate as C


def test_load_options_and_import_has_no_torch(onnx_artifact_dir):
    import subprocess
    import sys
    code = "import sys, sdk; sdk.Classifier.load(sys.argv[1], backend='onnx', num_threads=2); " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code, str(onnx_artifact_dir)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_top_k_and_json_round_trip(classifier, banana_jpg):
    p = classifier.classify(banana_jpg, top_k=3)
    assert all(len(v) == 3 for v in p.top_k.values())
    d = json.loads(p.to_json())
    assert d == json.loads(json.dumps(p.to_dict()))
    assert [x["label"] for x in d["full_path"]] == [x.label for x in p.full_path]
    assert d["top_k"]["fine"][0]["label"] == p.full_path[-1].label or p.full_path[-1].label in \
        [x["label"] for x in d["top_k"]["fine"]]
    with pytest.raises(ValueError, match="top_k"):
        classifier.classify(banana_jpg, top_k=0)


def test_back_off_stops_at_the_first_level_below_its_threshold(classifier, banana_jpg):
    full = classifier.classify(banana_jpg, thresholds=[0, 0, 0])
    assert full.is_complete and full.deepest_confident == full.full_path[-1]
    probs = [q.probability for q in full.full_path]
    # thresholds between the coarse and fine marginals: answer stops at coarse
    mid = classifier.classify(banana_jpg, thresholds=[0, probs[1], min(1.0, probs[2] + 1e-6)])
    assert [q.label for q in mid.path] == [q.label for q in full.full_path[:2]]
    assert mid.deepest_confident.level == "coarse" and not mid.is_complete
    none = classifier.classify(banana_jpg, thresholds={"category": min(1.0, probs[0] + 1e-6)})
    assert none.path == () and none.deepest_confident is None and none.breadcrumb() == "uncertain"
    with pytest.raises(ValueError, match="thresholds"):
        classifier.classify(banana_jpg, thresholds=[0.5, 0.5])
    with pytest.raises(ValueError, match="unknown levels"):
        classifier.classify(banana_jpg, thresholds={"species": 0.5})


@pytest.mark.parametrize("allow,deny,must_be_under", [
    (["Packages"], None, "Packages"),
    (["coarse:Apple", "Banana"], None, None),
    (None, ["Fruit", "Vegetables"], "Packages"),
])
def test_allow_deny_restrict_the_consistent_answer(classifier, banana_jpg, allow, deny, must_be_under):
    tax = classifier.taxonomy
    p = classifier.classify(banana_jpg, allow=allow, deny=deny)
    if must_be_under:
        assert p.full_path[0].label == must_be_under
    if allow and "Banana" in allow:
        assert p.full_path[1].label in ("Apple", "Banana")
    # renormalized over the allowed leaves: the allowed top-level marginals sum to 1
    assert abs(sum(s for _, s in p.top_k["category"]) - 1.0) < 1e-9
    assert 0.0 < p.allowed_mass <= 1.0
    mask = classifier.leaf_mask(allow, deny)
    leaf = p.full_path[-1].index
    assert mask[leaf]
    # top-k lists only nodes that still have allowed leaves
    dec = TreeDecoder(tax)
    for lvl, name in enumerate(tax.level_names):
        for label, _ in p.top_k[name]:
            assert mask[dec.anc[:, lvl] == tax.index(lvl, label)].any()


def test_allow_deny_errors(classifier, banana_jpg):
    with pytest.raises(TaxonomyError, match="no node named"):
        classifier.classify(banana_jpg, allow=["Spaceships"])
    with pytest.raises(ValueError, match="leave no leaf"):
        classifier.classify(banana_jpg, allow=["Fruit"], deny=["Fruit"])
    with pytest.raises(TypeError, match="list"):
        classifier.classify(banana_jpg, allow="Packages")


def test_unknown_flag(classifier, banana_jpg):
    p = classifier.classify(banana_jpg, unknown_threshold=0.0)
    assert p.is_unknown == (p.unknown_score > 0.0)
    assert p.is_unknown and p.path == () and p.breadcrumb() == "unknown item"
    q = classifier.classify(banana_jpg, unknown_threshold=None)
    assert not q.is_unknown and q.full_path == p.full_path


def test_pick_threshold():
    p = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6])
    ok = np.array([1, 1, 1, 0, 1, 1], bool)
    assert C.pick_threshold(p, ok, 1.0) == 0.9
    assert C.pick_threshold(p, ok, 0.75) == 0.6  # 5/6 >= 0.75 and every higher cut too
    assert C.pick_threshold(p, ~ok, 0.5) == 1.0  # never good enough: never answer
    assert C.pick_threshold(np.array([]), np.array([], bool), 0.9) == 1.0


def test_calibrated_thresholds_meet_the_target_on_their_data():
    rng = np.random.default_rng(0)
    from sdk.datasets import synthetic_taxonomy
    tax = synthetic_taxonomy()
    n = 400
    labels = np.asarray([tax.ancestors(2, int(i)) for i in rng.integers(0, 8, n)])
    lps = []
    for lvl, size in enumerate(tax.sizes):
        logits = rng.normal(0, 1, (n, size))
        logits[np.arange(n), labels[:, lvl]] += rng.uniform(0, 4, n)
        lps.append(logits - np.log(np.exp(logits).sum(1, keepdims=True)))
    ds = C.decode_set(tax, lps, labels)
    th = C.calibrate_thresholds(ds, 0.95)
    rep = C.decoding_report(ds, th, None, None, tax.level_names)
    for name in tax.level_names:
        assert np.isnan(rep[f"precision/{name}"]) or rep[f"precision/{name}"] >= 0.95
    assert rep["answered_node_precision"] >= 0.95
    assert rep["coverage/category"] > 0.5  # it does answer, it is not all back-off
    assert rep["coverage/category"] >= rep["coverage/coarse"] >= rep["coverage/fine"]


def test_calibrate_writes_only_the_decoding_section(model_copy, grocery_root, tmp_path):
    from sdk import load_dataset
    before = json.loads((model_copy / "manifest.json").read_text())
    clf = Classifier.load(model_copy)
    ds = load_dataset(grocery_root, "val", taxonomy=clf.taxonomy).subset(range(0, 296, 6))
    ood = C.out_of_catalogue_images(2)
    assert {k for k, _ in ood} == set(C.OUT_OF_CATALOGUE_KINDS)
    cal = C.calibrate(clf, C.batch_logprobs(clf, [s.source for s in ds.samples]), ds.labels(),
                      C.batch_logprobs(clf, [i for _, i in ood]), [k for k, _ in ood], 0.9, 0.05)
    C.write_decoding(model_copy, json.loads(json.dumps(cal.decoding(0.9, 0.05, "val", clf.taxonomy.level_names))))
    after = json.loads((model_copy / "manifest.json").read_text())
    assert {k: v for k, v in after.items() if k != "decoding"} == {k: v for k, v in before.items() if k != "decoding"}
    assert after["decoding"]["thresholds"] == [round(t, 6) for t in cal.thresholds]
    clf2 = Classifier.load(model_copy)  # the artifact hash still verifies
    assert clf2.thresholds == tuple(after["decoding"]["thresholds"])
    assert clf2.unknown_threshold == after["decoding"]["unknown_threshold"]
    assert clf2.unknown_score_kind == cal.unknown_score
    # the in-catalogue false-unknown rate is bounded by construction
    assert cal.report["flagged_unknown"] <= 0.05 + 1e-9
