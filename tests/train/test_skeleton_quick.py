import json

from sdk import Classifier, Manifest


def test_tiny_student_trains_and_writes_model_dir(tiny_student_dir):
    for f in ("model.safetensors", "config.json", "taxonomy.json", "metrics.json"):
        assert (tiny_student_dir / f).is_file(), f
    m = json.loads((tiny_student_dir / "metrics.json").read_text())
    # 3 photos per class and 2 epochs: well above chance (1/3) at the category level
    assert m["val"]["top1/category"] > 0.5


def test_onnx_artifact_classifies_real_photo(onnx_artifact_dir, banana_jpg):
    clf = Classifier.load(onnx_artifact_dir)
    pred = clf.classify(banana_jpg)
    assert [p.level for p in pred.full_path] == ["category", "coarse", "fine"]
    probs = [p.probability for p in pred.full_path]
    assert all(a >= b - 1e-9 for a, b in zip(probs, probs[1:]))
    assert Manifest.load(onnx_artifact_dir).metrics["parity"]["agreement/fine"] >= 0.995
