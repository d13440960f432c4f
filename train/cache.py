"""The cached path for slow machines (`freeze_blocks > 0`, `cache_views > 0`): the frozen prefix's outputs for
`cache_views` views of every photo (`train.data.load_view`) under `.cache/features/`, keyed by all that changes
them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from sdk import atomic_write

from .augment import Batch, draw_mix, mix, step_generator
from .backbones import normalize_uint8
from .data import HierDataset, load_view

if TYPE_CHECKING:
    from .loop import TrainConfig

CACHE_ROOT = Path(".cache/features")


def sha256_of(header: list, *blobs: bytes, samples=()) -> str:
    """sha256 of everything that changes a result: settings (`header`), weights (`blobs`), the photos' identities."""
    h = hashlib.sha256(json.dumps(header).encode())
    for b in blobs:
        h.update(b)
    for s in samples:
        h.update(s.key.encode())
    return h.hexdigest()


def cached_tensors(path: Path, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The safetensors file at `path`, written by `compute()` on first use."""
    from safetensors.torch import load_file, save_file
    if path.is_file():
        return load_file(str(path))
    tensors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: save_file(tensors, str(p)))
    return tensors


class FeatureCache:
    """Frozen-prefix outputs per (view, image), fp16 on disk, computed once: key "x" (block n_blocks - 1,
    the input of the trainable part) and "tap<i>" for every model tap inside the frozen prefix."""

    def __init__(self, model, ds: HierDataset, size: int, n_blocks: int, views: int, seed: int):
        self.model, self.ds, self.size, self.n_blocks, self.views, self.seed = model, ds, size, n_blocks, views, seed
        self.taps = tuple(t for t in model.cfg.taps if 0 <= t < n_blocks - 1)
        bb = model.backbone
        prefix = ("_conv_stem", "_bn0", *(f"_blocks.{i}." for i in range(n_blocks)))
        frozen = [k.encode() + v.numpy().tobytes()[:4096] for k, v in bb.state_dict().items() if k.startswith(prefix)]
        header = [bb.name, size, n_blocks, seed, "v3"] + ([list(self.taps)] if self.taps else [])
        self.key = sha256_of(header, *frozen, samples=ds.samples)[:20]

    def view(self, v: int) -> dict[str, torch.Tensor]:
        return cached_tensors(CACHE_ROOT / f"{self.key}-view{v}.safetensors", lambda: self._compute(v))

    @torch.inference_mode()
    def _compute(self, v: int) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        bb = self.model.backbone.eval()
        bs = 32
        for i in tqdm(range(0, len(self.ds), bs), leave=False, desc=f"caching frozen features (view {v})"):
            imgs = np.stack([load_view(s, self.size, v, self.seed) for s in self.ds.samples[i:i + bs]])
            out = bb.prefix(normalize_uint8(torch.from_numpy(imgs).permute(0, 3, 1, 2)), self.n_blocks, self.taps)
            parts.setdefault("x", []).append(out[self.n_blocks - 1].half())
            for t in self.taps:
                parts.setdefault(f"tap{t}", []).append(out[t].half())
        return {k: torch.cat(v).contiguous() for k, v in parts.items()}

    def all_views(self) -> dict[str, torch.Tensor]:
        views = [self.view(v) for v in range(self.views)]
        return {k: torch.stack([vw[k] for vw in views]) for k in views[0]}


def split_cached(batch: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    x = batch["x"].to(device).float()
    cached = {int(k[3:]): v.to(device).float() for k, v in batch.items() if k.startswith("tap")}
    return x, cached


class CachedFeed:
    """Each step one cached view per photo."""

    def __init__(self, feats: dict[str, torch.Tensor], tc: TrainConfig, start: int, device):
        self.feats, self.tc, self.start, self.device = feats, tc, start, device

    def batch(self, idx: torch.Tensor, epoch: int, step: int) -> tuple[tuple, Batch]:
        g = step_generator(self.tc.seed, epoch, step)
        view = torch.randint(0, self.tc.cache_views, (len(idx),), generator=g)
        m = draw_mix(len(idx), self.tc.mixup, self.tc.cutmix, g)
        x, cached = split_cached({k: v[(view, idx)] for k, v in self.feats.items()}, self.device)
        x, cached = mix(x, m), {t: mix(c, m) for t, c in cached.items()}
        return (x, self.start, cached), Batch(idx, m, views=view)
