"""Distillation: `python -m train distill --teacher DIR --data ROOT --out DIR`.

loss = labels (per level, coarse-only labels respected: `ce`) + alpha * per-level KL to the teacher's
temperature-softened distributions (`kd`).

Teacher outputs are computed once and cached on disk: the student trains on a fixed set of
augmentation views (the plain input, its mirror, seeded random crops; see train.data.load_view), and
each view is defined as fractions of the image, so the teacher sees exactly the crop the student sees,
at the teacher's own resolution. The cache key is the teacher's weights sha256 + the augmentation
seed + number of views + the training images, so a different teacher or seed never reuses stale
targets. (With on-the-fly augmentation caching would be wrong; distillation therefore requires
`cache_views > 0`.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .checkpoint import file_sha256, load_model
from .losses import LossContext, register_loss
from .loop import CACHE_ROOT, FeatureCache, TrainConfig, prepare_data, split_cached, train_model
from .models import ModelConfig
from sdk import Taxonomy


@register_loss("kd")
def kd_loss(ctx: LossContext) -> torch.Tensor:
    """Sum over levels of T^2 * KL(teacher_T || student_T) on temperature-softened log-probs."""
    t = ctx.aux.get("teacher")
    if t is None:
        raise ValueError("the kd loss needs teacher outputs: use `python -m train distill`")
    T = float(t["temperature"])
    total = ctx.logps[0].new_zeros(())
    for s_lp, t_lp in zip(ctx.logps, t["logps"]):
        s = F.log_softmax(s_lp.float() / T, -1)
        tt = F.log_softmax(t_lp.float() / T, -1)
        total = total + F.kl_div(s, tt, log_target=True, reduction="batchmean") * T * T
    return total


@torch.inference_mode()
def teacher_targets(teacher_dir: str | Path, train, views: int, seed: int, log=print) -> list[torch.Tensor]:
    """Per level, teacher log-probs of shape (views, N, n_level) for every cached view of `train`."""
    teacher, tcfg, _, tconf = load_model(teacher_dir)
    tfz = int(tconf.get("train", {}).get("freeze_blocks", 0)) or tcfg.taps[0]
    h = hashlib.sha256()
    h.update(file_sha256(Path(teacher_dir) / "model.safetensors").encode())
    h.update(json.dumps([seed, views, tcfg.image_size]).encode())
    for s in train.samples:
        h.update(s.key.encode())
    path = CACHE_ROOT.parent / "teacher" / f"{h.hexdigest()[:24]}.safetensors"
    if path.is_file():
        d = load_file(str(path))
        log(f"teacher targets from cache {path}")
        return [d[f"level{l}"] for l in range(len(d))]
    feats = FeatureCache(teacher, train, tcfg.image_size, tfz, views, seed).all_views()
    out: list[list[torch.Tensor]] = []
    for v in range(views):
        per = []
        for i in tqdm(range(0, len(train), 64), desc=f"teacher targets (view {v})", leave=False):
            x, cached = split_cached({k: t[v, i:i + 64] for k, t in feats.items()}, "cpu")
            per.append([lp.half() for lp in teacher.forward_from(x, tfz, cached=cached)])
        out.append([torch.cat([p[l] for p in per]) for l in range(len(per[0]))])
    levels = [torch.stack([o[l] for o in out]).contiguous() for l in range(len(out[0]))]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"level{l}": t for l, t in enumerate(levels)}, str(path))
    return levels


def distill(teacher_dir: str | Path, mc: ModelConfig, tc: TrainConfig, out: str | Path, temperature: float = 4.0,
            resume: bool = False, log=print) -> dict[str, Any]:
    if tc.cache_views <= 0 or tc.freeze_blocks <= 0:
        raise ValueError("distillation caches teacher outputs per augmentation view: use cache_views > 0 "
                         "and freeze_blocks > 0")
    if "kd" not in tc.losses.split(","):
        tc = replace(tc, losses=tc.losses + ",kd")
    _, train, _ = prepare_data(tc, None)
    ttax = Taxonomy.load(Path(teacher_dir) / "taxonomy.json")  # the weights are loaded once, below
    if ttax != train.taxonomy:
        raise ValueError(f"teacher taxonomy {ttax.hash[:12]} differs from the data's {train.taxonomy.hash[:12]}")
    targets = teacher_targets(teacher_dir, train, tc.cache_views, tc.seed, log)

    def teacher_fn(idx: torch.Tensor, views: torch.Tensor | None) -> dict[str, Any]:
        return {"logps": [t[views, idx] for t in targets], "temperature": temperature}

    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "distill.json").write_text(json.dumps({"teacher": str(teacher_dir), "temperature": temperature,
                                                        "teacher_sha256": file_sha256(Path(teacher_dir) / "model.safetensors")}, indent=1))
    return train_model(mc, tc, out, resume=resume, log=log, teacher=teacher_fn)
