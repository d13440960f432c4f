"""Every target: export the tiny real student, reload through the SDK, run on real photos, compare.

One `python -m converters all` run (the CLI itself, the `all_exports` fixture in tests/conftest.py)
produces the artifacts the tests share.
"""

from __future__ import annotations

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from sdk import BackendUnavailableError, Classifier, Manifest, ModelIntegrityError

RUNNABLE = ["onnx", "tflite", "executorch"]  # runnable on Linux; Core ML predicts on macOS only
FILES = {"onnx": "model.onnx", "tflite": "model.tflite", "executorch": "model.pte", "coreml": "model.mlpackage"}


@pytest.fixture(scope="session")
def val_images(tiny_student_dir, grocery_root) -> np.ndarray:
    """Real val photos other than the parity ones (offset spread), decoded as the SDK decodes them."""
    from sdk import prepare
    from train.data import load_dataset

    ds = load_dataset(str(grocery_root), "val")
    idx = np.linspace(7, len(ds) - 8, num=20).round().astype(int)
    return np.stack([prepare(ds.samples[i].source, 128) for i in idx])


@pytest.fixture(scope="session")
def torch_outputs(tiny_student_dir, val_images) -> tuple[list[np.ndarray], np.ndarray]:
    from converters import torch_outputs
    from train.checkpoint import load_model
    from train.models import DeployWrapper

    model, *_ = load_model(tiny_student_dir)
    return torch_outputs(DeployWrapper(model).eval(), val_images)


@pytest.fixture(scope="session")
def torch_reference(torch_outputs) -> list[np.ndarray]:
    return torch_outputs[0]


@pytest.mark.slow
def test_all_writes_every_target_with_its_manifest(all_exports):
    from converters import TARGETS

    assert sorted(p.name for p in all_exports.iterdir()) == sorted(TARGETS) == sorted(FILES)
    for t, name in FILES.items():
        m = Manifest.load(all_exports / t)
        assert m.target == t and m.file == name and (all_exports / t / name).exists()
        m.verify(all_exports / t)  # hash recorded after the last write to the artifact


@pytest.mark.slow
@pytest.mark.parametrize("target", RUNNABLE)
def test_manifest_carries_parity_measured_on_real_photos(all_exports, target):
    par = Manifest.load(all_exports / target).metrics["parity"]
    assert par["n_images"] == 24 and "val" in par["images"]
    assert par["agreement/fine"] >= 0.995
    assert max(par[f"max_abs_logprob/{l}"] for l in ("category", "coarse", "fine")) <= 1e-3
    assert par["embedding_cosine_min"] >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("target", list(FILES))
def test_every_artifact_declares_its_embedding_output(all_exports, target):
    m = Manifest.load(all_exports / target)
    assert m.embedding["name"] == "embedding" and m.embedding["normalized"] == "l2"
    assert m.embedding["dim"] == 1280 and m.embedding["feature"] == "pooled head conv"  # Lite0's head conv
    assert m.graph_outputs == [*m.outputs, "embedding"]


@pytest.mark.slow
@pytest.mark.parametrize("target", RUNNABLE)
def test_reloaded_embedding_matches_pytorch_on_unseen_photos(all_exports, target, val_images, torch_outputs):
    clf = Classifier.load(all_exports / target)
    emb = clf.embeddings(val_images)
    assert emb.shape == torch_outputs[1].shape and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    cos = (emb * torch_outputs[1]).sum(1)
    assert cos.min() >= 0.99, cos


@pytest.mark.slow
@pytest.mark.parametrize("target", RUNNABLE)
def test_reloaded_artifact_matches_pytorch_on_unseen_photos(all_exports, target, val_images, torch_reference):
    from converters import parity

    clf = Classifier.load(all_exports / target)
    cand = clf.logprobs(val_images)
    assert [c.shape for c in cand] == [r.shape for r in torch_reference]
    rec = parity(torch_reference, cand, clf.taxonomy)
    assert rec["agreement/path"] == 1.0, rec
    for lvl in clf.taxonomy.level_names:
        # fp32 end to end: 1e-4 is 30x the ~3e-6 measured, and catches a wrong activation (e.g. exact vs tanh GELU)
        assert rec[f"max_abs_logprob/{lvl}"] < 1e-4, rec
        assert rec[f"agreement/{lvl}"] == 1.0


@pytest.mark.slow
def test_sdk_gives_identical_paths_across_onnx_tflite_executorch(all_exports, grocery_root):
    photos = sorted((grocery_root / "val").rglob("*.jpg"))[::18][:16]
    assert len(photos) == 16
    answers = {}
    for t in RUNNABLE:
        preds = Classifier.load(all_exports / t).classify_batch(photos, raise_errors=True)
        answers[t] = [[(p.level, p.index) for p in pr.full_path] for pr in preds]
    assert answers["tflite"] == answers["onnx"]
    assert answers["executorch"] == answers["onnx"]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["tflite", "executorch"])
def test_fixed_batch_backend_splits_batches_and_is_safe_across_threads(all_exports, target, val_images):
    clf = Classifier.load(all_exports / target)
    assert clf._backend.fixed_batch == 1 and not clf._backend.inner.thread_safe
    serial = [clf.logprobs(val_images[i:i + 5]) for i in range(0, 20, 5)]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda i: clf.logprobs(val_images[i:i + 5]), range(0, 20, 5)))
    for s, p in zip(serial, parallel):
        for a, b in zip(s, p):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("target", list(FILES))
def test_sdk_refuses_artifact_whose_sha256_differs(all_exports, tmp_path, target):
    d = tmp_path / target
    shutil.copytree(all_exports / target, d)
    art = d / FILES[target]
    f = max((p for p in art.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size) if art.is_dir() else art
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the hash can tell
    f.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        Classifier.load(d)


@pytest.mark.slow
def test_onnx_file_carries_taxonomy_and_preprocessing(all_exports):
    import onnx

    props = {p.key: p.value for p in onnx.load(str(all_exports / "onnx" / "model.onnx")).metadata_props}
    m = Manifest.load(all_exports / "onnx")
    assert json.loads(props["hierfg.taxonomy"]) == m.taxonomy.to_dict()
    assert props["hierfg.taxonomy_hash"] == m.taxonomy.hash
    pre = json.loads(props["hierfg.preprocessing"])
    assert pre["size"] == 128 and pre["dtype"] == "uint8" and pre["layout"] == "NHWC"


@pytest.mark.slow
def test_executorch_keeps_only_allowed_ops_outside_xnnpack(all_exports):
    from converters.executorch import PORTABLE_ALLOWED

    exp = Manifest.load(all_exports / "executorch").metrics["export"]
    assert exp["delegate_segments"] >= 1
    assert set(exp["portable_ops"]) <= PORTABLE_ALLOWED
    heavy = {"aten.convolution.default", "aten.linear.default", "aten.addmm.default", "aten.mm.default", "aten.bmm.default"}
    assert not heavy & set(exp["portable_ops"])


def test_delegation_check_names_forbidden_ops():
    from collections import Counter

    from converters import ExportError
    from converters.executorch import check_delegation

    check_delegation(Counter({"aten.native_layer_norm.default": 19, "aten.expand_copy.default": 3}))
    with pytest.raises(ExportError, match=r"aten\.bmm\.default.*quantized_decomposed"):
        check_delegation(Counter({"aten.native_layer_norm.default": 1, "aten.bmm.default": 2,
                                  "quantized_decomposed.dequantize_per_channel.default": 1}))


def test_executorch_gelu_tanh_decomposition_matches_torch_and_leaves_exact_gelu_alone():
    import torch
    import torch.nn.functional as F

    from converters.executorch import _gelu_tanh

    x = torch.linspace(-8, 8, 4001)
    torch.testing.assert_close(_gelu_tanh(x, approximate="tanh"), F.gelu(x, approximate="tanh"), atol=1e-6, rtol=0)
    assert _gelu_tanh(x) is NotImplemented


@pytest.mark.slow
def test_coreml_package_spec_and_metadata_verified_on_any_os(all_exports):
    from converters.coreml import verify_package

    m = Manifest.load(all_exports / "coreml")
    rec = verify_package(all_exports / "coreml" / "model.mlpackage", m.taxonomy, 128, 1, m.embedding["dim"])
    assert rec["input"] == ["image", [1, 128, 128, 3], "float32"]
    assert [o[0] for o in rec["outputs"]] == m.graph_outputs
    assert {"hierfg.taxonomy", "hierfg.preprocessing", "hierfg.outputs", "hierfg.embedding"} <= set(rec["metadata_keys"])
    if sys.platform != "darwin":
        assert m.metrics["parity"]["measured"] is False and "macOS" in m.metrics["parity"]["reason"]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS refusal")
def test_coreml_load_off_macos_raises_typed_error_saying_why(all_exports):
    with pytest.raises(BackendUnavailableError, match="needs macOS"):
        Classifier.load(all_exports / "coreml")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS (the Core ML framework); "
                                                     "on Linux only the package spec and metadata are checked")
def test_coreml_prediction_matches_pytorch_on_macos(all_exports, val_images, torch_reference):
    from converters import parity

    clf = Classifier.load(all_exports / "coreml")
    rec = parity(torch_reference, clf.logprobs(val_images), clf.taxonomy)
    assert rec["agreement/fine"] == 1.0 and rec["max_abs_logprob/fine"] < 1e-3


def test_unknown_option_is_refused_before_any_work(tmp_path):
    from converters import ExportError
    from converters._common import validate_options

    assert validate_options("tflite", {}) == {"batch": 1}
    with pytest.raises(ExportError, match="does not accept option"):
        validate_options("executorch", {"opset": 17})


@pytest.mark.slow
def test_tflite_file_carries_taxonomy_and_preprocessing(all_exports):
    from converters.tflite import read_metadata

    meta = read_metadata(all_exports / "tflite" / "model.tflite")
    m = Manifest.load(all_exports / "tflite")
    assert json.loads(meta["hierfg.taxonomy"]) == m.taxonomy.to_dict()
    assert json.loads(meta["hierfg.outputs"]) == m.outputs
    assert json.loads(meta["hierfg.embedding"]) == m.embedding
    assert json.loads(meta["hierfg.preprocessing"])["dtype"] == "uint8"


def test_tflite_keeps_no_module_paths_as_tensor_names(all_exports):
    """Intermediate tensor names (PyTorch module paths, debug information) are stripped; the signature the
    SDK binds by is intact."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs((all_exports / "tflite" / "model.tflite").read_bytes(), 0)
    g = model.Subgraphs(0)
    io = set(g.InputsAsNumpy().tolist()) | set(g.OutputsAsNumpy().tolist())
    inner = [i for i in range(g.TensorsLength()) if i not in io]
    assert inner and all(g.Tensors(i).Name().decode() == str(i) for i in inner)
    sig = model.SignatureDefs(0)
    assert sorted(sig.Outputs(i).Name().decode() for i in range(sig.OutputsLength())) == \
        [f"output_{i}" for i in range(len(Manifest.load(all_exports / "tflite").graph_outputs))]


def test_int8_parity_gate_forgives_near_ties_and_catches_decided_flips():
    """A lossy artifact may flip photos the reference barely decides; flipping a decided one is a fault."""
    from converters import parity
    from converters._common import agreement_passes
    from train.data import synthetic_taxonomy

    tax = synthetic_taxonomy()
    n_fine = tax.sizes[-1]
    ref_fine = np.full((4, n_fine), -9.0)
    ref_fine[:, 0], ref_fine[:, 1] = np.log(0.5), np.log(0.45)  # photos 0-3: class 0 by 0.105 nats
    ref_fine[3, 0], ref_fine[3, 1] = np.log(0.9), np.log(0.05)  # photo 3: decided by 2.9 nats
    coarse = [np.full((4, n), -np.log(n)) for n in tax.sizes[:-1]]
    flip = ref_fine.copy()
    flip[0, [0, 1]] = flip[0, [1, 0]]  # a near-tie flipped
    rec = parity(coarse + [ref_fine], coarse + [flip], tax, tie_margin=0.25)
    fine = tax.level_names[-1]
    assert rec[f"agreement/{fine}"] == 0.75 and rec["near_ties"] == 3 and rec[f"agreement_decided/{fine}"] == 1.0
    assert agreement_passes(rec, fine, 0.95, 0.25) and not agreement_passes(rec, fine, 0.95)
    flip[3, [0, 1]] = flip[3, [1, 0]]  # and a decided photo flipped
    rec = parity(coarse + [ref_fine], coarse + [flip], tax, tie_margin=0.25)
    assert rec[f"agreement_decided/{fine}"] == 0.0
    assert agreement_passes(rec, fine, 0.95, 0.25)  # 1 flip of 1 decided photo: the floor's share rounded up
    # 1 of 8 decided photos flipped passes a 95 % floor, 2 of 8 do not
    assert agreement_passes({"n_images": 24, "near_ties": 16, f"agreement_decided/{fine}": 7 / 8}, fine, 0.95, 0.25)
    assert not agreement_passes({"n_images": 24, "near_ties": 16, f"agreement_decided/{fine}": 6 / 8}, fine, 0.95, 0.25)
    assert f"agreement_decided/{fine}" not in parity(coarse + [ref_fine], coarse + [flip], tax)
