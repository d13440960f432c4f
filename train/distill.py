"""Distillation (`python -m train distill --teacher DIR [--teacher DIR2 …]`): labels (`ce`) + per-level KL to
the teachers' temperature-softened distributions (`kd`), teachers averaged in probability. Live path: the teachers
run on each step's own view at their own resolution; cached path: their outputs per cached view, stored on disk."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import load_model
from .losses import LossContext, register_loss
from .augment import Batch
from .cache import CACHE_ROOT, FeatureCache, cached_tensors, sha256_of
from .loop import (TrainConfig, autocast, predict_logprobs, prepare_data, resolve_precision, select_device,
                   train_model)
from .models import ModelConfig
from sdk import Taxonomy, sha256_file


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


def teacher_targets(teacher_dir: str | Path, train, views: int, seed: int, log=print) -> list[torch.Tensor]:
    """Per level, teacher log-probs of shape (views, N, n_level) for every cached view of `train`."""
    teacher, tcfg, _, tconf = load_model(teacher_dir)
    tfz = int(tconf.get("train", {}).get("freeze_blocks", 0)) or tcfg.taps[0]
    key = sha256_of([seed, views, tcfg.image_size, "v3"], sha256_file(Path(teacher_dir) / "model.safetensors").encode(),
                    samples=train.samples)
    path = CACHE_ROOT.parent / "teacher" / f"{key[:24]}.safetensors"
    if path.is_file():
        log(f"teacher targets from cache {path}")

    def compute() -> dict[str, torch.Tensor]:  # keyed above by the teacher's weights, seed, views and images
        cache = FeatureCache(teacher, train, tcfg.image_size, tfz, views, seed)
        per_view = [predict_logprobs(teacher, train, tcfg.image_size, 64, feats=cache.view(v), start=tfz)
                    for v in range(views)]
        return {f"level{l}": torch.stack([torch.from_numpy(p[l]) for p in per_view]).half()
                for l in range(len(per_view[0]))}
    d = cached_tensors(path, compute)
    return [d[f"level{l}"] for l in range(len(d))]


def ensemble(per_teacher: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per level, the log of the teachers' mean probability."""
    k = len(per_teacher)
    return [torch.logsumexp(torch.stack([t[l].float() for t in per_teacher]), 0) - math.log(k)
            for l in range(len(per_teacher[0]))]


class LiveTeachers:
    def __init__(self, teacher_dirs: list[str], device, precision: str, channels_last: bool):
        self.models = []
        for d in teacher_dirs:
            model, cfg, _, _ = load_model(d)
            model.to(device)
            if channels_last:
                model.to(memory_format=torch.channels_last)
            self.models.append((model, cfg.image_size))
        self.device, self.precision = device, precision

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> list[torch.Tensor]:
        outs = []
        for model, size in self.models:
            with autocast(self.device, self.precision):
                outs.append([lp.float() for lp in model.forward_from(batch.render(size), 0)])
        return ensemble(outs)


def distill(teacher_dir: str | Path | list, mc: ModelConfig, tc: TrainConfig, out: str | Path,
            temperature: float = 4.0, resume: bool = False, log=print) -> dict[str, Any]:
    teachers = [str(t) for t in (teacher_dir if isinstance(teacher_dir, (list, tuple)) else [teacher_dir])]
    if "kd" not in tc.losses.split(","):
        tc = replace(tc, losses=tc.losses + ",kd")
    _, train, _ = prepare_data(tc, None)
    for t in teachers:  # the weights are loaded once, below
        ttax = Taxonomy.load(Path(t) / "taxonomy.json")
        if ttax != train.taxonomy:
            raise ValueError(f"teacher {t}: taxonomy {ttax.hash[:12]} differs from the data's {train.taxonomy.hash[:12]}")
    if tc.freeze_blocks > 0 and tc.cache_views > 0:
        targets = ensemble([teacher_targets(t, train, tc.cache_views, tc.seed, log) for t in teachers])

        def logps(batch: Batch) -> list[torch.Tensor]:
            return [t[batch.views, batch.idx] for t in targets]
    else:
        device = select_device(tc.device)
        logps = LiveTeachers(teachers, device, resolve_precision(tc.precision, device), tc.channels_last)

    def teacher_fn(batch: Batch) -> dict[str, Any]:
        return {"logps": logps(batch), "temperature": temperature}

    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "distill.json").write_text(json.dumps({
        "teachers": teachers, "temperature": temperature,
        "teacher_sha256": [sha256_file(Path(t) / "model.safetensors") for t in teachers]}, indent=1))
    return train_model(mc, tc, out, resume=resume, log=log, teacher=teacher_fn)
