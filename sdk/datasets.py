"""Labelled image sets: a Grocery Store root, a folder tree, and an embedded synthetic generator.

The SDK calibrates on them and training builds on them, so both read the same files the same way.
A sample is an image (a file path, or a uint8 HxWx3 array for synthetic data) and one label index per
level, -1 where the image is not labelled at that level. numpy only; images are decoded by the caller.
"""

from __future__ import annotations

import hashlib
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ._taxonomy import IMAGE_SUFFIXES, Taxonomy


@dataclass(frozen=True)
class Sample:
    source: str | np.ndarray  # a file path, or an in-memory uint8 HxWx3 image (synthetic data)
    labels: tuple[int, ...]  # one index per level, -1 = unlabelled at that level
    name: str = ""  # the file's path relative to the dataset root (POSIX), set by the readers

    @property
    def key(self) -> str:
        """What identifies the image in cache keys and seeds its random crops: the path relative to the
        dataset root, so `--data /abs/root` and `--data ../root` give the same crops and share caches."""
        if isinstance(self.source, np.ndarray):
            return hashlib.sha1(self.source.tobytes()).hexdigest()
        return self.name or str(self.source)


@dataclass
class HierDataset:
    taxonomy: Taxonomy
    samples: list[Sample]
    name: str = ""

    def __len__(self) -> int:
        return len(self.samples)

    def labels(self) -> np.ndarray:
        return np.asarray([s.labels for s in self.samples], dtype=np.int64)

    def subset(self, indices: Sequence[int], name: str | None = None) -> "HierDataset":
        return HierDataset(self.taxonomy, [self.samples[i] for i in indices], name or self.name)


def full_labels(taxonomy: Taxonomy, leaf: int) -> tuple[int, ...]:
    return tuple(taxonomy.ancestors(taxonomy.depth - 1, leaf))


def read_grocery(root: str | Path, split: str = "train", taxonomy: Taxonomy | None = None) -> HierDataset:
    """Read `<root>/<split>.txt` (lines `relative/path.jpg, fine_id, coarse_id`) of the Grocery Store dataset."""
    root = Path(root)
    taxonomy = taxonomy or Taxonomy.from_grocery(root)
    split_file = root / f"{split}.txt"
    if not split_file.is_file():
        have = sorted(p.stem for p in root.glob("*.txt"))
        raise FileNotFoundError(f"{split_file} not found; split files in {root}: {have}")
    samples = []
    for ln, line in enumerate(split_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            raise ValueError(f"{split_file}:{ln}: expected 'path, fine_id, coarse_id', got {line!r}")
        fine, coarse = int(parts[1]), int(parts[2])
        labels = full_labels(taxonomy, fine)
        if labels[1] != coarse:
            raise ValueError(f"{split_file}:{ln}: coarse id {coarse} is not the parent of fine id {fine}")
        samples.append(Sample(str(root / parts[0]), labels, Path(parts[0]).as_posix()))
    return HierDataset(taxonomy, samples, f"grocery:{split}")


def read_folder_tree(root: str | Path, taxonomy: Taxonomy | None = None) -> HierDataset:
    """Read `root/<level0>/…/<leaf>/*.jpg`; images at another depth are skipped."""
    root = Path(root)
    taxonomy = taxonomy or Taxonomy.from_folder_tree(root)
    samples = []
    for p in sorted(root.rglob("*")):
        parts = p.parent.relative_to(root).parts
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and len(parts) == taxonomy.depth:
            leaf = [taxonomy.index(lvl, name) for lvl, name in enumerate(parts)][-1]
            samples.append(Sample(str(p), full_labels(taxonomy, leaf), p.relative_to(root).as_posix()))
    return HierDataset(taxonomy, samples, f"folder:{root.name}")


def load_dataset(root: str | Path, split: str, taxonomy: Taxonomy | None = None) -> HierDataset:
    """A Grocery-style root (has classes.csv and `<split>.txt`) or a folder tree `<root>/<split>/…`;
    the special root `synthetic` gives the embedded generator."""
    if str(root) == "synthetic":
        return synthetic_dataset(split, taxonomy=taxonomy)
    root = Path(root)
    if (root / "classes.csv").is_file():
        return read_grocery(root, split, taxonomy)
    if (root / split).is_dir():
        return read_folder_tree(root / split, taxonomy)
    raise FileNotFoundError(f"{root}: neither a Grocery Store root (classes.csv + {split}.txt) "
                            f"nor a folder tree with a {split}/ folder")


def restrict_to_list(ds: HierDataset, listing: str | Path) -> HierDataset:
    """The photos of `ds` named in a list file (one path per line, as `holdout.txt` writes them)."""
    keep = {str(Path(l.strip())) for l in Path(listing).read_text().splitlines() if l.strip()}
    out = ds.subset([i for i, s in enumerate(ds.samples) if str(Path(str(s.source))) in keep],
                    f"{ds.name} ({Path(listing).name})")
    if not len(out):
        raise ValueError(f"{listing}: none of its paths are in {ds.name}")
    return out


def stratified_holdout(ds: HierDataset, fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Fixed stratified split of indices by finest label: (kept for training, held out)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, s in enumerate(ds.samples):
        by_class.setdefault(s.labels[-1], []).append(i)
    keep, hold = [], []
    for c in sorted(by_class):
        idx = by_class[c]
        rng.shuffle(idx)
        k = int(round(len(idx) * fraction))
        hold += idx[:k]
        keep += idx[k:]
    return sorted(keep), sorted(hold)


# ---- synthetic ------------------------------------------------------------------------------------
SYNTH_TREE = {
    "Round": {"Ball": ["Red-Ball", "Blue-Ball"], "Ring": ["Green-Ring", "Yellow-Ring"]},
    "Angular": {"Box": ["Red-Box", "Blue-Box"], "Cross": ["Green-Cross", "Yellow-Cross"]},
}
_COLORS = {"Red": (220, 40, 40), "Blue": (40, 70, 220), "Green": (40, 180, 60), "Yellow": (230, 210, 40)}


def synthetic_taxonomy() -> Taxonomy:
    paths = [(cat, coarse, fine) for cat, cs in SYNTH_TREE.items() for coarse, fs in cs.items() for fine in fs]
    return Taxonomy.from_paths(["category", "coarse", "fine"], paths)


def _draw(shape: str, color: tuple[int, int, int], rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    bg = rng.integers(90, 200, size=3).astype(np.float32)
    img = np.ones((size, size, 3), np.float32) * bg + rng.normal(0, 12, (size, size, 3))
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    r = rng.uniform(0.18, 0.3) * size
    dx, dy = xx - cx, yy - cy
    if shape == "Ball":
        mask = dx ** 2 + dy ** 2 < r ** 2
    elif shape == "Ring":
        d2 = dx ** 2 + dy ** 2
        mask = (d2 < r ** 2) & (d2 > (0.55 * r) ** 2)
    elif shape == "Box":
        mask = (np.abs(dx) < r) & (np.abs(dy) < r)
    else:  # Cross
        mask = ((np.abs(dx) < r) & (np.abs(dy) < 0.3 * r)) | ((np.abs(dy) < r) & (np.abs(dx) < 0.3 * r))
    col = np.asarray(color, np.float32) + rng.normal(0, 15, 3)
    img[mask] = col + rng.normal(0, 8, (int(mask.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_dataset(split: str = "train", per_class: int | None = None, size: int = 96,
                      taxonomy: Taxonomy | None = None) -> HierDataset:
    """Coloured shapes on noisy backgrounds: category = round/angular, coarse = shape, fine = colour.
    Deterministic per split name; no files needed."""
    taxonomy = taxonomy or synthetic_taxonomy()
    per_class = per_class or {"train": 40, "val": 12, "test": 12}.get(split, 12)
    # a stable seed (str hash() changes with every interpreter start)
    seed = {"train": 0, "val": 1, "test": 2}.get(split, zlib.crc32(split.encode()) % 1000)
    rng = np.random.default_rng(seed)
    samples = []
    for leaf, name in enumerate(taxonomy.names(taxonomy.depth - 1)):
        color, shape = name.split("-")
        samples += [Sample(_draw(shape, _COLORS[color], rng, size), full_labels(taxonomy, leaf))
                    for _ in range(per_class)]
    return HierDataset(taxonomy, samples, f"synthetic:{split}")
