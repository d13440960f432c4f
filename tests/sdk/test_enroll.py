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


def test_enrollment_only_splits_its_parents_mass(model_copy, new_photos, other_photos):
    """The new leaf takes its share of the parent's mass: coarser marginals and every answer under another
    parent stay exactly as they were."""
    photos = [*other_photos, *new_photos]
    before = Classifier.load(model_copy).classify_batch(photos)
    after = enrolled(model_copy, new_photos).classify_batch(photos)
    for b, a in zip(before, after):
        depth = 3 if b.full_path[1].label != "Apple" else 2
        assert [x.label for x in a.full_path[:depth]] == [x.label for x in b.full_path[:depth]]
        assert [x.probability for x in a.full_path[:depth]] == pytest.approx([x.probability for x in b.full_path[:depth]])
    assert sum(b.full_path[1].label != "Apple" for b in before) >= 5
    assert sum(a.full_path[-1].label == NEW for a in after) >= 4  # and it does take the product's photos


def test_calibration_record_puts_both_sides_on_one_footing(model_copy, new_photos):
    cls = enrolled(model_copy, new_photos).enrolled[0]
    cal = cls.calibration
    assert cls.n_photos == 5 and cal["views"] == 10 and cls.parent == "Apple"
    assert abs(float(np.linalg.norm(cls.prototype)) - 1) < 1e-5
    # the tie point sits below the product's own cosines, so its photos outscore the trained best
    assert cal["tie_cosine"] < cal["own_cosine_mean"] and cal["own_wins"] >= 0.8
    assert cal["own_minus_trained_mean"] > 0 and 0 < cal["parent_mass_mean"] <= 1


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

    def foreign(d):  # a well-formed file made for another model: its own hash is right
        d["model_sha256"] = "0" * 64
        payload = {k: v for k, v in d.items() if k != "sha256"}
        d["sha256"] = hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    f.write_bytes(good)
    _rewrite(f, foreign)
    with pytest.raises(EnrollmentFileError, match="made for another model"):
        Classifier.load(model_copy)
    assert Classifier.load(model_copy, enrollment=False).enrolled == ()  # the model itself still loads


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
    assert clf.classify(new_photos[0]).full_path
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
