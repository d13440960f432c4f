"""Training's datasets: the readers live in `sdk.datasets` (the SDK calibrates on exactly what training
reads); this module adds HRN relabelling and the augmented views of the cached path, all through
`sdk.prepare`, the device's decoding.
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np

from sdk import prepare
# re-exported: training code and its tests read datasets through train.data
from sdk.datasets import (SYNTH_TREE, HierDataset, Sample, full_labels, load_dataset, read_folder_tree,  # noqa: F401
                          read_grocery, stratified_holdout, synthetic_dataset, synthetic_taxonomy)


def relabel_coarse(ds: HierDataset, ratio: float, seed: int = 0) -> HierDataset:
    """HRN's relabelling: move `ratio` of the images' finest labels up to their parent (-1 below)."""
    if ratio <= 0:
        return ds
    rng = random.Random(seed)
    out = [replace(s, labels=s.labels[:-1] + (-1,)) if rng.random() < ratio else s for s in ds.samples]
    return HierDataset(ds.taxonomy, out, ds.name + f"+relabel{ratio}")


# ---- decoding for training ------------------------------------------------------------------------
def random_crop_box(rng: random.Random, scale=(0.55, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[float, float, float, float]:
    """RandomResizedCrop-style box as fractions of the image."""
    for _ in range(10):
        area = rng.uniform(*scale)
        r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        w, h = np.sqrt(area * r), np.sqrt(area / r)
        if w <= 1 and h <= 1:
            l, t = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            return (l, t, l + w, t + h)
    return (0.0, 0.0, 1.0, 1.0)


def load_view(sample: Sample, size: int, view: int, seed: int) -> np.ndarray:
    """View 0: the device's exact input. View 1: its mirror. Views >= 2: seeded random crop + flip."""
    if view == 0:
        return prepare(sample.source, size)
    if view == 1:
        return prepare(sample.source, size, flip=True)
    rng = random.Random(f"{seed}:{view}:{sample.key}")
    return prepare(sample.source, size, crop=random_crop_box(rng), flip=rng.random() < 0.5)
