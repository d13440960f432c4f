"""Real-photo image sets for calibration, sensitivity and evaluation, decoded exactly as the SDK decodes.

Calibration and sensitivity photos come from the training split *minus* its 20 % stratified slice, so the
photos that judge int8 on that slice never set a quantization range.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from sdk import Taxonomy, load_dataset, prepare, stratified_holdout

MIN_CALIBRATION_IMAGES = 300


class CalibrationWarning(UserWarning):
    """Fewer calibration photos than recommended: int8 ranges may not cover real inputs."""


@dataclass(frozen=True)
class ImageSet:
    """uint8 (N, S, S, 3) images, their labels (N, depth) and where they came from."""

    images: np.ndarray
    labels: np.ndarray
    source: str
    names: tuple[str, ...] = ()  # each photo's path relative to the dataset root (empty: unnamed)

    def __len__(self) -> int:
        return len(self.images)


def _spread(indices: list[int], labels: np.ndarray, n: int, seed: int) -> list[int]:
    """Up to n indices, round-robin over fine classes so every class is represented."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i in indices:
        by_class.setdefault(int(labels[i, -1]), []).append(i)
    for v in by_class.values():
        rng.shuffle(v)
    out: list[int] = []
    depth = 0
    while len(out) < n and any(depth < len(v) for v in by_class.values()):
        for c in sorted(by_class):
            if depth < len(by_class[c]) and len(out) < n:
                out.append(by_class[c][depth])
        depth += 1
    return sorted(out)


def _decode(ds, idx: list[int], size: int, what: str) -> ImageSet:
    if not idx:
        raise ValueError(f"no images selected for {what} from {ds.name}")
    imgs = np.stack([prepare(ds.samples[i].source, size) for i in idx])
    labels = np.asarray([ds.samples[i].labels for i in idx])
    names = tuple(ds.samples[i].name or f"#{i}" for i in idx)
    return ImageSet(imgs, labels, f"{ds.name}: {len(idx)} photos ({what})", names)


def calibration_sets(data: str, size: int, taxonomy: Taxonomy, n_calibration: int = 300,
                     n_sensitivity: int = 200, sensitivity_from_slice: bool = False) -> tuple[ImageSet, ImageSet]:
    """(calibration photos, disjoint sensitivity photos), both from `train` outside its 20 % slice.

    `sensitivity_from_slice` (the model was trained without the slice): the sensitivity photos come from the
    slice, since on photos a model memorized every family agrees 100 % with fp32 and nothing can be ranked.
    Warns (CalibrationWarning) below 300 calibration photos; never falls back to random tensors.
    """
    if n_calibration < 1:
        raise ValueError("calibration needs at least one real photo (--calibration-images >= 1; 300 recommended)")
    if n_calibration < MIN_CALIBRATION_IMAGES:
        warnings.warn(f"calibrating on {n_calibration} photos; at least {MIN_CALIBRATION_IMAGES} are recommended "
                      "so the int8 ranges cover real inputs", CalibrationWarning, stacklevel=2)
    ds = load_dataset(data, "train", taxonomy=taxonomy)
    keep, hold = stratified_holdout(ds, 0.2, seed=0)
    labels = ds.labels()
    calib = _spread(keep, labels, n_calibration, 0)
    rest = sorted(hold) if sensitivity_from_slice else sorted(set(keep) - set(calib))
    sens = _spread(rest, labels, n_sensitivity, 1) if n_sensitivity else []
    if len(calib) < n_calibration:
        warnings.warn(f"train has only {len(calib)} photos outside its 20 % slice; calibrating on those",
                      CalibrationWarning, stacklevel=2)
    cal = _decode(ds, calib, size, "calibration")
    what = "sensitivity, from the 20 % slice the model did not train on" if sensitivity_from_slice else "sensitivity"
    sen = _decode(ds, sens, size, what) if sens else ImageSet(cal.images[:0], cal.labels[:0], "none")
    return cal, sen


def evaluation_sets(data: str, size: int, taxonomy: Taxonomy, limit: int = 0) -> dict[str, ImageSet]:
    """The sets int8 is judged on: all of `val` and the 20 % stratified slice of `train` (`limit` caps each)."""
    out: dict[str, ImageSet] = {}
    val = load_dataset(data, "val", taxonomy=taxonomy)
    idx = list(range(len(val)))
    out["val"] = _decode(val, _spread(idx, val.labels(), limit, 0) if limit else idx, size, "val")
    tr = load_dataset(data, "train", taxonomy=taxonomy)
    _, hold = stratified_holdout(tr, 0.2, seed=0)
    out["train20"] = _decode(tr, _spread(hold, tr.labels(), limit, 0) if limit else hold, size,
                             "20 % stratified train slice")
    return out
