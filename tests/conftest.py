"""Shared fixtures: the real Grocery Store photos and a tiny student trained on a few of them.

The tiny student is a real training run (pretrained Lite0, 128 px, 3 photos per fine class, 2 epochs),
small enough for CI and real enough that exports and int8 are judged on a trained network.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GROCERY = Path(os.environ.get("HIERFG_GROCERY", ROOT.parent / "shared" / "datasets" / "grocery-store"))


def pytest_collection_modifyitems(config, items):
    # keep CPU use predictable on 2-core machines
    os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def grocery_root() -> Path:
    if not (GROCERY / "classes.csv").is_file():
        pytest.fail(f"the Grocery Store dataset is expected at {GROCERY} (set HIERFG_GROCERY)")
    return GROCERY


@pytest.fixture(scope="session")
def banana_jpg(grocery_root) -> Path:
    return grocery_root / "train/Fruit/Banana/Banana_001.jpg"


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory, grocery_root) -> Path:
    """A model directory (model.safetensors + config.json + taxonomy.json) trained on real photos."""
    from train.loop import TrainConfig, train_model
    from train.models import ModelConfig

    out = tmp_path_factory.mktemp("tiny_student")
    mc = ModelConfig(image_size=128, d_model=64, heads=2)
    tc = TrainConfig(data=str(grocery_root), epochs=2, batch_size=32, limit_per_class=3, limit_val=48,
                     cache_views=1, freeze_blocks=11, lr=3e-3, precision="fp32")
    train_model(mc, tc, out, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def onnx_artifact_dir(tmp_path_factory, tiny_student_dir, grocery_root) -> Path:
    from converters import export_checkpoint

    from sdk import Classifier, load_dataset

    out = tmp_path_factory.mktemp("onnx_artifact")
    export_checkpoint(tiny_student_dir, "onnx", out, data=str(grocery_root), split="val", n_parity=24)
    # embedding statistics for enrollment from the photos it trained on (3 per class), Granny Smith left out:
    # to the enrollment tests a product photographed like it is one the trained classes do not cover
    clf = Classifier.load(out, enrollment=False)
    leaf = clf.base_taxonomy.depth - 1
    ds = load_dataset(grocery_root, "train", taxonomy=clf.base_taxonomy)
    names = [clf.base_taxonomy.node(leaf, int(i)).name for i in ds.labels()[:, -1]]
    pick: list[int] = []
    for i, n in enumerate(names):
        if n != "Granny-Smith" and sum(names[j] == n for j in pick) < 3:
            pick.append(i)
    clf.write_embedding_stats([ds.samples[i].source for i in pick], [names[i] for i in pick], source="3 per class")
    return out


@pytest.fixture(scope="session")
def all_exports(tmp_path_factory, tiny_student_dir, grocery_root) -> Path:
    """`python -m converters all` (the CLI itself) on the tiny student: one artifact directory per target,
    shared read-only by the converter, SDK and concurrency tests (copy before changing a file)."""
    from converters.__main__ import main

    out = tmp_path_factory.mktemp("exports")
    assert main(["all", "--checkpoint", str(tiny_student_dir), "--out", str(out), "--data", str(grocery_root),
                 "--parity-images", "24"]) == 0
    return out



@pytest.fixture
def background_threads():
    """`with background_threads(work, n) as errors:` runs `work(k, done)` in n threads (k = 0..n-1) while the
    block runs, then sets `done`, joins them and fails the test with what any of them raised."""
    @contextlib.contextmanager
    def run(work, n: int):
        done, errors = threading.Event(), []

        def body(k: int) -> None:
            try:
                work(k, done)
            except BaseException as e:  # surfaced below; a thread must not die silently
                errors.append(e)

        threads = [threading.Thread(target=body, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        try:
            yield errors
        finally:
            done.set()
            for t in threads:
                t.join()
        assert not errors, errors[:3]
    return run
