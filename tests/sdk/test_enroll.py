"""Few-shot enrollment through the real ONNX artifact of the tiny student and real Grocery photos:
a new product under an existing parent, decodable, persisted, reloaded, forgotten; the enrollment file
refused when damaged, altered or made for another model; a failed write leaves the old file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sdk import (ENROLLMENT_NAME, Classifier, EmbeddingUnavailableError, EnrollmentError, EnrollmentFileError,
                 Manifest)

NEW = "Granny-Smith-Organic"  # a "new SKU": photographed like Granny Smith, unknown to the trained heads


@pytest.fixture(scope="session")
def new_photos(grocery_root) -> list[Path]:
    return sorted((grocery_root / "train/Fruit/Apple/Granny-Smith").glob("*.jpg"))[-5:]


@pytest.fixture(scope="session")
def other_photos(grocery_root) -> list[Path]:
    """Photos of trained products in other parents, for what enrollment must leave alone."""
    return [sorted((grocery_root / "val" / p).rglob("*.jpg"))[0]
            for p in ("Fruit/Banana", "Vegetables/Carrots", "Packages/Milk", "Fruit/Kiwi", "Vegetables/Aubergine",
                      "Packages/Juice", "Vegetables/Cabbage", "Packages/Oat-Milk", "Vegetables/Leek", "Fruit/Lemon")]


def enrolled(model_copy: Path, new_photos) -> Classifier:
    clf = Classifier.load(model_copy)
    clf.enroll(NEW, "Apple", new_photos)
    return clf


def test_enrolled_product_is_a_leaf_under_its_parent_and_wins_its_own_photos(model_copy, new_photos):
    clf = enrolled(model_copy, new_photos)
    tax, base = clf.taxonomy, clf.base_taxonomy
    assert tax.sizes == (*base.sizes[:-1], base.sizes[-1] + 1)
    assert tax.path(2, tax.sizes[-1] - 1) == ["Fruit", "Apple", NEW]
    preds = clf.classify_batch(new_photos, top_k=3)
    assert sum(p.full_path[-1].label == NEW for p in preds) >= 4, [p.full_path[-1].label for p in preds]
    for p in preds:
        assert [x.label for x in p.full_path[:2]] == ["Fruit", "Apple"]
        probs = [x.probability for x in p.full_path]
        assert all(c <= a + 1e-9 for a, c in zip(probs, probs[1:]))  # tree-consistent marginals
    lp = clf.logprobs(np.stack([clf.preprocess(f) for f in new_photos]))
    assert [l.shape[1] for l in lp] == list(tax.sizes)
    np.testing.assert_allclose(np.exp(lp[-1]).sum(1), 1.0, atol=1e-6)  # float32 model outputs


def test_other_products_keep_their_answers_and_the_levels_stay_marginals(model_copy, new_photos, other_photos):
    """A photo nearer a trained class than the new prototype keeps the model's answer at every level, its
    probabilities scaled by one common factor <= 1; the new product's share is added to its leaf and to
    its parent and category, so every level still sums to one."""
    clf = Classifier.load(model_copy)
    before = clf.classify_batch(other_photos)
    clf.enroll(NEW, "Apple", new_photos)
    after = clf.classify_batch(other_photos)
    for b, a in zip(before, after):
        assert [x.label for x in a.full_path] == [x.label for x in b.full_path]
        ratio = [y.probability / x.probability for x, y in zip(b.full_path, a.full_path)]
        assert max(ratio) <= 1 + 1e-6 and max(ratio) - min(ratio) < 1e-5  # float32 outputs
        assert min(ratio) > 0.99  # their photos are far from the new prototype: almost nothing moves
    tax = clf.taxonomy
    lps = clf.logprobs(np.stack([clf.preprocess(f) for f in [*new_photos, *other_photos]]))
    new_leaf = np.exp(lps[-1][:, -1])
    assert new_leaf[:5].mean() > 0.5 > new_leaf[5:].max()
    for level, (name, lp) in enumerate(zip(["Fruit", "Apple"], lps)):
        np.testing.assert_allclose(np.exp(lp).sum(1), 1.0, atol=1e-6)
        assert (np.exp(lp[:, tax.index(level, name)]) >= new_leaf - 1e-9).all()  # its ancestors carry its mass


def test_calibration_record_says_how_its_own_photos_score(model_copy, new_photos):
    cls = enrolled(model_copy, new_photos).enrolled[0]
    cal = cls.calibration
    assert cls.n_photos == 5 and cal["views"] == 10 and cls.parent == "Apple"
    assert abs(float(np.linalg.norm(cls.prototype)) - 1) < 1e-5
    # left out in turn, its photos are nearer the others' prototype than to any trained class, mostly
    assert cal["own_wins"] >= 0.7 and cal["own_margin_mean"] > 0 and cal["own_margin_min"] <= cal["own_margin_mean"]
    assert sum(cal["nearest_trained"].values()) <= 10 and set(cal["nearest_trained"]) <= set(
        Classifier.load(model_copy).base_taxonomy.names(2))


def test_unseen_photos_of_the_product_are_answered_as_it(model_copy, new_photos, grocery_root):
    unseen = sorted((grocery_root / "val/Fruit/Apple/Granny-Smith").glob("*.jpg"))
    preds = enrolled(model_copy, new_photos).classify_batch(unseen)
    assert sum(p.full_path[-1].label == NEW for p in preds) >= len(unseen) - 1


def test_enrollment_persists_reloads_and_forget_removes_it(model_copy, new_photos, banana_jpg):
    clf = enrolled(model_copy, new_photos)
    doc = json.loads((model_copy / ENROLLMENT_NAME).read_text())
    assert doc["model_sha256"] == Manifest.load(model_copy).sha256 and [c["label"] for c in doc["classes"]] == [NEW]
    again = Classifier.load(model_copy)
    assert [c.label for c in again.enrolled] == [NEW] and again.taxonomy == clf.taxonomy
    assert again.classify(new_photos[0]).to_dict() == clf.classify(new_photos[0]).to_dict()
    again.forget(NEW)
    assert again.enrolled == () and again.taxonomy == again.base_taxonomy
    assert Classifier.load(model_copy).enrolled == ()
    with pytest.raises(EnrollmentError, match="no enrolled class"):
        again.forget(NEW)
    with pytest.raises(EnrollmentError, match="trained class"):
        again.forget("Banana")


def test_requests_that_cannot_be_honoured_are_refused(model_copy, new_photos, tmp_path):
    clf = enrolled(model_copy, new_photos)
    with pytest.raises(EnrollmentError, match="already exists"):
        clf.enroll(NEW, "Apple", new_photos[:2])
    with pytest.raises(EnrollmentError, match="already exists"):
        clf.enroll("Granny-Smith", "Apple", new_photos[:2])
    with pytest.raises(EnrollmentError, match="no 'coarse' node named 'Fruit'"):
        clf.enroll("X", "Fruit", new_photos[:2])  # a category, not a coarse node
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="image 1"):
        clf.enroll("Y", "Apple", [new_photos[0], bad])
    with pytest.raises(TypeError):
        clf.enroll("Y", "Apple", str(new_photos[0]))
    with pytest.raises(EnrollmentError, match="at least 2 photos"):
        clf.enroll("Y", "Apple", new_photos[:1])
    assert [c.label for c in Classifier.load(model_copy).enrolled] == [NEW]  # nothing half-added


def _rewrite(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def test_tampered_corrupt_or_foreign_file_is_refused(model_copy, new_photos):
    import hashlib
    enrolled(model_copy, new_photos)
    f = model_copy / ENROLLMENT_NAME
    good = f.read_bytes()

    _rewrite(f, lambda d: d["classes"][0].update(bias=d["classes"][0]["bias"] + 5))
    with pytest.raises(EnrollmentFileError, match="content hash mismatch"):
        Classifier.load(model_copy)

    f.write_bytes(good[: len(good) // 2])
    with pytest.raises(EnrollmentFileError, match="not readable as JSON"):
        Classifier.load(model_copy)

    def resigned(**fields):  # a well-formed file with other bindings: its own hash is right
        def change(d):
            d.update(fields)
            payload = {k: v for k, v in d.items() if k != "sha256"}
            d["sha256"] = hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        return change

    for fields, message in (({"model_sha256": "0" * 64}, "made for another model"),  # another model
                            ({"stats_sha256": "1" * 64}, "other embedding statistics")):  # another space
        f.write_bytes(good)
        _rewrite(f, resigned(**fields))
        with pytest.raises(EnrollmentFileError, match=message):
            Classifier.load(model_copy)
    assert Classifier.load(model_copy, enrollment=False).enrolled == ()  # the model itself still loads


def test_embedding_statistics_are_checked_needed_and_rewritable(model_copy, new_photos, grocery_root):
    from sdk import ModelIntegrityError
    m = json.loads((model_copy / "manifest.json").read_text())
    stats = model_copy / m["embedding"]["stats"]["file"]
    assert m["embedding"]["stats"]["photos"] == 3 * 80 and stats.is_file()
    good = stats.read_bytes()
    stats.write_bytes(good[:-10])
    with pytest.raises(ModelIntegrityError, match="sha256 does not match"):
        Classifier.load(model_copy)
    stats.unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        Classifier.load(model_copy)
    stats.write_bytes(good)

    clf = enrolled(model_copy, new_photos)
    with pytest.raises(EnrollmentError, match="forget the enrolled products first"):
        clf.write_embedding_stats(new_photos[:2], ["Granny-Smith"] * 2)
    clf.forget(NEW)
    with pytest.raises(ValueError, match="not trained 'fine' classes"):
        clf.write_embedding_stats(new_photos[:2], [NEW] * 2)
    r = cli("embedding-stats", "--model", model_copy, "--data", grocery_root, "--per-class", 1)
    assert r.returncode == 0, r.stderr
    m2 = json.loads((model_copy / "manifest.json").read_text())
    rec = m2["embedding"]["stats"]
    assert rec["file"] != m["embedding"]["stats"]["file"] and rec["classes"] == 81 and "without the 20 % slice" in rec["data"]
    assert not stats.exists() and (model_copy / rec["file"]).is_file()  # the old file went once the manifest moved on
    assert m2["sha256"] == m["sha256"]  # the model itself is untouched
    assert "enrolling  statistics" in cli("info", "--model", model_copy).stdout

    m2["embedding"].pop("stats")
    (model_copy / "manifest.json").write_text(json.dumps(m2))
    bare = Classifier.load(model_copy)
    assert not bare.can_enroll and clf.can_enroll
    with pytest.raises(EnrollmentError, match="python -m sdk embedding-stats"):
        bare.enroll(NEW, "Apple", new_photos)


def test_failed_write_leaves_the_old_file_and_the_old_answers(model_copy, new_photos, monkeypatch):
    clf = enrolled(model_copy, new_photos)
    f = model_copy / ENROLLMENT_NAME
    old = f.read_bytes()

    def power_cut(fd):  # the process dies after the new bytes were written, before they were made durable
        raise OSError("simulated kill during the write")

    monkeypatch.setattr(os, "fsync", power_cut)
    with pytest.raises(OSError, match="simulated kill"):
        clf.enroll("Second-Apple", "Apple", new_photos[:2])
    with pytest.raises(OSError, match="simulated kill"):
        clf.forget(NEW)
    monkeypatch.undo()
    assert f.read_bytes() == old
    assert not [p for p in model_copy.iterdir() if p.name.endswith(".tmp")]
    assert [c.label for c in clf.enrolled] == [NEW]  # memory still matches the disk
    assert [c.label for c in Classifier.load(model_copy).enrolled] == [NEW]


def test_classify_during_enroll_and_forget_sees_one_whole_state(model_copy, new_photos, other_photos,
                                                                background_threads):
    """enroll / forget in one thread while others classify: every answer is consistent with the tree it
    reports (`taxonomy`: the trained one, or it plus the new product), never a mix, and nothing raises."""
    clf = Classifier.load(model_copy)
    base = clf.base_taxonomy
    photos = [clf.preprocess(p) for p in (*new_photos, *other_photos[:3])]
    seen = set()

    def check(p) -> None:
        tax = p.taxonomy
        assert tax is not None and tax.sizes in (base.sizes, (*base.sizes[:-1], base.sizes[-1] + 1))
        for a, b in zip(p.full_path, p.full_path[1:]):
            assert tax.parent(tax.level_names.index(b.level), b.index) == a.index
            assert b.probability <= a.probability + 1e-12
        assert all(tax.node(l, q.index).name == q.label for l, q in enumerate(p.full_path))
        assert {label for label, _ in p.top_k["fine"]} <= set(tax.names(2))
        seen.add(tax.sizes[-1])

    def classify(k: int, done: threading.Event) -> None:
        while not done.is_set():
            check(clf.classify(photos[k % len(photos)], allow=["Fruit"] if k % 2 else None))
            for p in clf.classify_batch(photos[k % 3:k % 3 + 3]):
                check(p)
            k += 1

    with background_threads(classify, 3) as errors:
        for _ in range(4):
            clf.enroll(NEW, "Apple", new_photos)
            deadline = time.monotonic() + 60
            while base.sizes[-1] + 1 not in seen and time.monotonic() < deadline and not errors:
                time.sleep(0.05)  # until a classify has answered with the new product in the tree
            clf.forget(NEW)
    assert seen == {base.sizes[-1], base.sizes[-1] + 1}
    assert clf.enrolled == () and Classifier.load(model_copy).enrolled == ()


@pytest.fixture(scope="session")
def legacy_artifact_dir(tmp_path_factory, tiny_student_dir, grocery_root) -> Path:
    """An ONNX export without the embedding output, as every artifact before it was added."""
    from converters import ExportSpec, parity_images
    from converters.onnx import export
    from train.checkpoint import load_model
    from train.models import DeployWrapper

    model, cfg, tax, _ = load_model(tiny_student_dir)
    images, source = parity_images(str(grocery_root), "val", cfg.image_size, 8, taxonomy=tax)
    out = tmp_path_factory.mktemp("legacy_onnx")
    export(DeployWrapper(model, embedding=False).eval(), ExportSpec(cfg.image_size, images=images, image_source=source), out)
    return out


def test_artifact_without_embedding_loads_classifies_and_says_to_reexport(legacy_artifact_dir, new_photos, tmp_path):
    raw = json.loads((legacy_artifact_dir / "manifest.json").read_text())
    assert "embedding" not in raw
    clf = Classifier.load(legacy_artifact_dir)
    assert clf.classify(new_photos[0]).full_path and not clf.can_enroll
    for call in (lambda: clf.enroll(NEW, "Apple", new_photos), lambda: clf.embed(new_photos)):
        with pytest.raises(EmbeddingUnavailableError, match="re-export"):
            call()


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sdk", *map(str, args)], capture_output=True, text=True)


def test_cli_enroll_and_forget(model_copy, new_photos):
    r = cli("enroll", "--model", model_copy, "--label", NEW, "--parent", "Apple", *new_photos)
    assert r.returncode == 0, r.stderr
    assert f"enrolled '{NEW}' under 'Apple' from 5 photos" in r.stdout and ENROLLMENT_NAME in r.stdout
    r = cli("classify", "--model", model_copy, new_photos[0])
    assert r.returncode == 0 and "Apple" in r.stdout
    r = cli("enroll", "--model", model_copy, "--label", "Z", "--parent", "Nowhere", new_photos[0])
    assert r.returncode == 2 and r.stderr.startswith("error: EnrollmentError: no 'coarse' node named 'Nowhere'")
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("forget", "--model", model_copy, "--label", NEW)
    assert r.returncode == 0 and "forgot" in r.stdout
    r = cli("forget", "--model", model_copy, "--label", NEW)
    assert r.returncode == 2 and "no enrolled class" in r.stderr
