"""`sdk.datasets` (the readers the SDK calibrates on and training builds on) and `sdk.atomic_write`."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

import sdk
from sdk.datasets import (load_dataset, read_folder_tree, read_grocery, stratified_holdout, synthetic_dataset,
                          synthetic_taxonomy)


def test_sdk_reads_datasets_and_calibrates_without_train_or_torch():
    code = ("import sys, sdk, sdk.datasets, sdk._calibrate, sdk.__main__; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'train', 'torch', 'tqdm', 'matplotlib'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_train_data_reexports_the_sdk_readers():
    import train.data as td
    for name in ("Sample", "HierDataset", "read_grocery", "read_folder_tree", "load_dataset", "stratified_holdout",
                 "synthetic_dataset", "synthetic_taxonomy", "full_labels", "SYNTH_TREE"):
        assert getattr(td, name) is getattr(sdk.datasets, name)


def test_grocery_split_file(grocery_root):
    ds = read_grocery(grocery_root, "val")
    assert ds.taxonomy == sdk.Taxonomy.from_grocery(grocery_root) and len(ds) == 296
    s = ds.samples[0]
    assert s.name == "val/Fruit/Apple/Golden-Delicious/Golden-Delicious_001.jpg" and s.key == s.name
    assert ds.taxonomy.path(2, s.labels[2]) == ["Fruit", "Apple", "Golden-Delicious"]
    assert load_dataset(grocery_root, "val").samples == ds.samples
    with pytest.raises(FileNotFoundError, match="split files"):
        read_grocery(grocery_root, "nope")


def test_grocery_line_whose_coarse_id_is_not_the_parent(grocery_root, tmp_path):
    (tmp_path / "classes.csv").write_bytes((grocery_root / "classes.csv").read_bytes())
    (tmp_path / "train.txt").write_text("train/Fruit/Apple/Golden-Delicious/x.jpg, 0, 5\n")
    with pytest.raises(ValueError, match="train.txt:1: coarse id 5 is not the parent of fine id 0"):
        read_grocery(tmp_path, "train")


def test_folder_tree(tmp_path):
    for p in ["train/Fruit/Apple/Gala", "train/Fruit/Apple/Pink", "train/Veg/Leek/Leek"]:
        (tmp_path / p).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / p / "a.jpg")
    (tmp_path / "train/Fruit/notes.txt").write_text("not an image")
    ds = load_dataset(tmp_path, "train")
    assert ds.taxonomy.sizes == (2, 2, 3) and len(ds) == 3
    assert [s.name for s in ds.samples] == ["Fruit/Apple/Gala/a.jpg", "Fruit/Apple/Pink/a.jpg", "Veg/Leek/Leek/a.jpg"]
    assert ds.labels().tolist() == [[0, 0, 0], [0, 0, 1], [1, 1, 2]]
    assert read_folder_tree(tmp_path / "train", ds.taxonomy).samples == ds.samples
    with pytest.raises(FileNotFoundError, match="neither a Grocery Store root"):
        load_dataset(tmp_path, "val")


def test_synthetic_is_deterministic_per_split_in_every_process():
    code = "import sdk.datasets as d; print(d.synthetic_dataset('ood', 1, 16).samples[0].key)"
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(keys) == 1  # not seeded by str hash(), which changes with every interpreter start
    ds = synthetic_dataset("val", per_class=2, size=32)
    assert ds.taxonomy == synthetic_taxonomy() and len(ds) == 16 and ds.samples[0].source.shape == (32, 32, 3)
    assert load_dataset("synthetic", "val").labels().tolist() == synthetic_dataset("val").labels().tolist()


def test_stratified_holdout_is_fixed_and_per_class():
    ds = synthetic_dataset("train", per_class=10, size=8)
    keep, hold = stratified_holdout(ds, 0.2, seed=3)
    assert sorted(keep + hold) == list(range(len(ds))) and (keep, hold) == stratified_holdout(ds, 0.2, seed=3)
    assert np.bincount(ds.labels()[hold, -1]).tolist() == [2] * 8


def test_atomic_write_from_many_threads_leaves_one_whole_file(tmp_path):
    dest = tmp_path / "image.bin"
    blobs = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=sdk.atomic_write, args=(dest, b)) for b in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert dest.read_bytes() in blobs
    assert [p.name for p in tmp_path.iterdir()] == ["image.bin"]  # no temporary file left behind
    sdk.atomic_write(dest, "text ✓")
    assert dest.read_text(encoding="utf-8") == "text ✓"
    sdk.atomic_write(dest, lambda p: p.write_bytes(b"by a writer"))
    assert dest.read_bytes() == b"by a writer"

    def dies_half_way(p):
        p.write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        sdk.atomic_write(dest, dies_half_way)
    assert dest.read_bytes() == b"by a writer" and len(list(tmp_path.iterdir())) == 1
