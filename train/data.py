"""Training's datasets: the readers live in `sdk.datasets` (the SDK calibrates on exactly what training
reads); this module adds HRN relabelling and the augmented views of the cached path, all through
`sdk.prepare`, the device's decoding.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

import numpy as np
import torch

from sdk import prepare
# re-exported: training code and its tests read datasets through train.data
from sdk.datasets import (SYNTH_TREE, HierDataset, Sample, full_labels, load_dataset, read_folder_tree,  # noqa: F401
                          read_grocery, stratified_holdout, synthetic_dataset, synthetic_taxonomy)

from .augment import Augmenter


def relabel_coarse(ds: HierDataset, ratio: float, seed: int = 0) -> HierDataset:
    """HRN's relabelling: move `ratio` of the images' finest labels up to their parent (-1 below)."""
    if ratio <= 0:
        return ds
    rng = random.Random(seed)
    out = [replace(s, labels=s.labels[:-1] + (-1,)) if rng.random() < ratio else s for s in ds.samples]
    return HierDataset(ds.taxonomy, out, ds.name + f"+relabel{ratio}")


def load_view(sample: Sample, size: int, view: int, seed: int) -> np.ndarray:
    """View 0: the device's exact input. View 1: its mirror. Views >= 2: a seeded random resized crop (area >= 0.55)
    and flip, as `Augmenter` draws them, cut from the full photo."""
    if view < 2:
        return prepare(sample.source, size, flip=view == 1)
    g = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}:{view}:{sample.key}".encode()).hexdigest()[:15], 16))
    (w, _, cx), (_, h, cy) = Augmenter("basic", crop_scale=0.55).draw(1, g).theta[0].tolist()  # [-1, 1] coordinates
    box = ((cx - abs(w) + 1) / 2, (cy - h + 1) / 2, (cx + abs(w) + 1) / 2, (cy + h + 1) / 2)
    return prepare(sample.source, size, crop=box, flip=w < 0)
