"""Training loop for hierarchical query models (student now; the teacher reuses it).

CPU-friendly by design: the first `freeze_blocks` backbone blocks are frozen and their outputs are
computed once per image and augmentation view (`cache_views` views: the plain input, its mirror, and
seeded random crops) and stored on disk under `.cache/features/`, keyed by everything that changes
them. Each epoch draws one cached view per image and trains the rest of the network on it.
With `freeze_blocks == 0` or `cache_views == 0` images are decoded and augmented on the fly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sdk import Taxonomy

from . import checkpoint as ckpt
from .backbones import normalize_uint8
from .data import HierDataset, load_dataset, load_view, relabel_coarse, stratified_holdout
from .int8_consistency import consistency_loss, int8_prefix, rng_snapshot
from .metrics import compute_metrics, format_metrics
from .models import ModelConfig, build_model

CACHE_ROOT = Path(".cache/features")


@dataclass(frozen=True)
class TrainConfig:
    data: str = "synthetic"
    train_split: str = "train"
    val_split: str = "val"
    holdout_fraction: float = 0.0  # >0: hold out a stratified slice of train (written to holdout.txt)
    relabel_ratio: float = 0.0
    epochs: int = 12
    batch_size: int = 32
    lr: float = 1e-3
    lr_backbone: float = 3e-4
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    freeze_blocks: int = 11
    cache_views: int = 4
    seed: int = 0
    limit_per_class: int = 0  # >0: at most this many train images per finest class (tests)
    limit_val: int = 0
    threads: int = 0  # 0: torch default
    losses: str = "ce"  # registered losses, comma-separated (train.losses.list_losses())
    loss_weights: str = ""  # e.g. "cluster=0.1,tree=1"
    device: str = "auto"  # auto: cuda when available
    ema: float = 0.0  # >0: evaluate and save an exponential moving average of the weights (decay per step)
    mixup: float = 0.0  # >0: Beta(a, a) mixup of the trainable part's input features and of the losses
    int8_consistency: float = 0.0  # >0: weight of KL(fp32 || int8 view of the same weights) (train.int8_consistency)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def limit_per_class(ds: HierDataset, k: int, seed: int = 0) -> HierDataset:
    if k <= 0:
        return ds
    rng = random.Random(seed)
    by: dict[int, list[int]] = {}
    for i, s in enumerate(ds.samples):
        by.setdefault(s.labels[-1], []).append(i)
    keep = sorted(i for v in by.values() for i in rng.sample(v, min(k, len(v))))
    return ds.subset(keep)


class FeatureCache:
    """Frozen-prefix outputs for (view, image), fp16 on disk, computed once.

    Stores the output of block `n_blocks - 1` (key "x", the input of the trainable part) and every
    model tap that lies inside the frozen prefix (keys "tap<i>").
    """

    def __init__(self, model, ds: HierDataset, size: int, n_blocks: int, views: int, seed: int, int8: bool = False):
        self.model, self.ds, self.size, self.n_blocks, self.views, self.seed = model, ds, size, n_blocks, views, seed
        self.int8 = int8  # the prefix run with int8 weights and inputs (train.int8_consistency.int8_prefix)
        self.taps = tuple(t for t in model.cfg.taps if 0 <= t < n_blocks - 1)
        bb = model.backbone
        h = hashlib.sha256()
        h.update(json.dumps([bb.name, size, n_blocks, seed, "v2"] + ([list(self.taps)] if self.taps else [])
                            + (["int8"] if int8 else [])).encode())
        for k, v in bb.state_dict().items():
            if k.startswith(("_conv_stem", "_bn0")) or any(k.startswith(f"_blocks.{i}.") for i in range(n_blocks)):
                h.update(k.encode())
                h.update(v.numpy().tobytes()[:4096])
        for s in ds.samples:
            h.update(s.key.encode())
        self.key = h.hexdigest()[:20]

    def view(self, v: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file, save_file
        path = CACHE_ROOT / f"{self.key}-view{v}.safetensors"
        if path.is_file():
            return load_file(str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        parts: dict[str, list[torch.Tensor]] = {}
        bb = self.model.backbone.eval()
        bs = 32
        with torch.inference_mode():
            for i in tqdm(range(0, len(self.ds), bs), leave=False,
                          desc=f"caching frozen {'int8 ' if self.int8 else ''}features (view {v})"):
                imgs = np.stack([load_view(s, self.size, v, self.seed) for s in self.ds.samples[i:i + bs]])
                x = normalize_uint8(torch.from_numpy(imgs).permute(0, 3, 1, 2))
                out = (int8_prefix if self.int8 else type(bb).prefix)(bb, x, self.n_blocks, self.taps)
                parts.setdefault("x", []).append(out[self.n_blocks - 1].half())
                for t in self.taps:
                    parts.setdefault(f"tap{t}", []).append(out[t].half())
        feats = {k: torch.cat(v).contiguous() for k, v in parts.items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(feats, str(tmp))
        tmp.replace(path)
        return feats

    def all_views(self) -> dict[str, torch.Tensor]:
        views = [self.view(v) for v in range(self.views)]
        return {k: torch.stack([vw[k] for vw in views]) for k in views[0]}


def split_cached(batch: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    x = batch["x"].to(device).float()
    cached = {int(k[3:]): v.to(device).float() for k, v in batch.items() if k.startswith("tap")}
    return x, cached


def cached_batch(feats: dict[str, torch.Tensor], rows: tuple[torch.Tensor, torch.Tensor], pair: torch.Tensor | None,
                 lam: float, start: int, device) -> tuple[torch.Tensor, int, dict[int, torch.Tensor]]:
    """The model's forward arguments (x, start block, cached taps) for a training batch of cached features:
    `rows` = (view, image) indices, mixed with the batch permutation `pair` at weight `lam` under mixup."""
    x, cached = split_cached({k: v[rows] for k, v in feats.items()}, device)
    if pair is not None:
        x = lam * x + (1 - lam) * x[pair]
        cached = {t: lam * c + (1 - lam) * c[pair] for t, c in cached.items()}
    return x, start, cached


class WeightEMA:
    """Exponential moving average of every float parameter and buffer (BatchNorm statistics too).

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates: without it the freshly
    initialized heads stay in the average (0.998 over 1,000 steps keeps 13.5 % of the random init).
    `swapped(model)` temporarily loads the average into the model (evaluation, saving)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1.0 - d)
        self.updates += 1

    @contextlib.contextmanager
    def swapped(self, model: torch.nn.Module):
        live = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(live, strict=False)


def _param_groups(model, tc: TrainConfig):
    bb, rest = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (bb if n.startswith("backbone.") else rest).append(p)
    return [{"params": bb, "lr": tc.lr_backbone}, {"params": rest, "lr": tc.lr}]


def freeze_prefix(model, n_blocks: int) -> None:
    bb = model.backbone
    mods = [bb._conv_stem, bb._bn0] + [bb._blocks[i] for i in range(n_blocks)]
    if bb._fc is not None:
        mods.append(bb._fc)
    for m in mods:
        for p in m.parameters():
            p.requires_grad_(False)


def set_train_mode(model, n_blocks: int) -> None:
    model.train()
    bb = model.backbone
    for m in [bb._bn0] + [bb._blocks[i] for i in range(n_blocks)]:
        m.eval()  # frozen BatchNorm keeps its ImageNet statistics


@torch.inference_mode()
def predict_logprobs(model, ds: HierDataset, size: int, batch_size: int = 32,
                     feats: dict[str, torch.Tensor] | None = None, start: int = 0, progress: bool = True,
                     device="cpu") -> list[np.ndarray]:
    """Per-level log-probs over a dataset at the device's exact input (view 0)."""
    model.eval()
    outs: list[list[np.ndarray]] = []
    it = range(0, len(ds), batch_size)
    for i in tqdm(it, desc="evaluating", leave=False, disable=not progress):
        if feats is not None:
            x, cached = split_cached({k: v[i:i + batch_size] for k, v in feats.items()}, device)
            lps = model.forward_from(x, start, cached=cached)
        else:
            imgs = np.stack([load_view(s, size, 0, 0) for s in ds.samples[i:i + batch_size]])
            lps = model.forward_from(normalize_uint8(torch.from_numpy(imgs).permute(0, 3, 1, 2)).to(device), 0)
        outs.append([lp.float().cpu().numpy() for lp in lps])
    return [np.concatenate([o[l] for o in outs]) for l in range(len(outs[0]))]


def prepare_data(tc: TrainConfig, out: Path | None) -> tuple[Taxonomy, HierDataset, dict[str, HierDataset]]:
    train = load_dataset(tc.data, tc.train_split)
    tax = train.taxonomy
    evals: dict[str, HierDataset] = {}
    if tc.holdout_fraction > 0:
        keep, hold = stratified_holdout(train, tc.holdout_fraction, tc.seed)
        if out is not None:
            (out / "holdout.txt").write_text("\n".join(str(train.samples[i].source) for i in hold) + "\n")
        evals["holdout"] = train.subset(hold, train.name + ":holdout")
        train = train.subset(keep)
    train = limit_per_class(train, tc.limit_per_class, tc.seed)
    train = relabel_coarse(train, tc.relabel_ratio, tc.seed)
    try:
        val = load_dataset(tc.data, tc.val_split, taxonomy=tax)
        if tc.limit_val:
            val = val.subset(range(min(tc.limit_val, len(val))))
        evals = {tc.val_split: val, **evals}
    except FileNotFoundError:
        pass
    return tax, train, evals


def _dist_info() -> tuple[int, int]:
    import os
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_model(mc: ModelConfig, tc: TrainConfig, out: str | Path, resume: bool = False,
                log=print, teacher=None) -> dict[str, Any]:
    """Train, evaluate every epoch, save the model directory. Returns the final metrics per eval split.

    Under `torchrun` (WORLD_SIZE > 1) this runs DistributedDataParallel: gloo on CPU, nccl on CUDA;
    each rank trains on its shard of every epoch's permutation, rank 0 evaluates and writes.
    `teacher` (a callable returning per-sample teacher targets) is used by distillation.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .losses import LossContext, get_loss, parse_weights

    out = Path(out)
    rank, world = _dist_info()
    device = select_device(tc.device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            import os
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main_rank = rank == 0
    log = log if main_rank else (lambda *a, **k: None)
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    tax, train, evals = prepare_data(tc, out if main_rank else None)
    if main_rank:
        (out / "config.resolved.json").write_text(json.dumps({"model": mc.to_dict(), "train": asdict(tc)}, indent=1))
    model = build_model(tax, mc, pretrained=True)
    nfz = tc.freeze_blocks
    freeze_prefix(model, nfz)
    use_cache = nfz > 0 and tc.cache_views > 0
    feats = evfeats = feats_q = None
    if use_cache:
        t0 = time.time()
        if world > 1 and not main_rank:
            dist.barrier()  # rank 0 builds the on-disk cache first; the others then read it
        feats = FeatureCache(model, train, mc.image_size, nfz, tc.cache_views, tc.seed).all_views()
        if tc.int8_consistency > 0:  # the int8 pass starts from the frozen prefix's int8 output
            feats_q = FeatureCache(model, train, mc.image_size, nfz, tc.cache_views, tc.seed, int8=True).all_views()
        evfeats = {k: FeatureCache(model, d, mc.image_size, nfz, 1, tc.seed).view(0) for k, d in evals.items()}
        if world > 1 and main_rank:
            dist.barrier()
        log(f"frozen features ready: { {k: tuple(v.shape) for k, v in feats.items()} } in {time.time() - t0:.0f}s")
    if hasattr(model, "initialize_from_data"):
        model.initialize_from_data(train, feats, nfz)  # e.g. eigen-image query init (same on every rank)
    model.to(device)
    labels = torch.from_numpy(train.labels())
    losses = [l.strip() for l in tc.losses.split(",") if l.strip()]
    weights = parse_weights(tc.loss_weights)
    loss_fns = {name: get_loss(name) for name in losses}
    opt = torch.optim.AdamW(_param_groups(model, tc), weight_decay=tc.weight_decay)
    steps_per_epoch = math.ceil(len(train) / (tc.batch_size * world))
    total = steps_per_epoch * tc.epochs
    warm = min(steps_per_epoch, total // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    ema = WeightEMA(model, tc.ema) if tc.ema > 0 else None
    start_epoch, history = (ckpt.load_training_state(out, model, opt, sched, ema=ema) if resume else (0, []))
    if resume and start_epoch:
        log(f"resuming after epoch {start_epoch - 1} from {out / 'checkpoint'}")
    net = DDP(model, find_unused_parameters=True) if world > 1 else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    g = torch.Generator().manual_seed(tc.seed)
    metrics: dict[str, Any] = history[-1]["eval"] if history else {}
    for epoch in range(start_epoch, tc.epochs):
        t0 = time.time()
        set_train_mode(model, nfz)
        g.manual_seed(tc.seed * 1000 + epoch)  # the epoch's order depends only on (seed, epoch): resumable
        perm = torch.randperm(len(train), generator=g)[rank::world]
        view_of = torch.randint(0, max(tc.cache_views, 1), (len(train),), generator=g)
        running = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{tc.epochs}", leave=False, disable=not main_rank)
        for step in bar:
            idx = perm[step * tc.batch_size:(step + 1) * tc.batch_size]
            if len(idx) == 0:
                idx = perm[:tc.batch_size]  # uneven shards: every rank must take the same number of steps
            aux: dict = {"index": idx, "epoch": epoch}
            with amp if amp is not None else torch.autocast("cpu", enabled=False):
                lam, pair = 1.0, None
                if tc.mixup > 0:  # the draw depends only on (seed, epoch, step): resumable
                    mg = torch.Generator().manual_seed(tc.seed * 1_000_003 + epoch * 10_007 + step)
                    lam = float(np.random.default_rng(tc.seed * 1_000_003 + epoch * 10_007 + step).beta(tc.mixup, tc.mixup))
                    pair = torch.randperm(len(idx), generator=mg)
                if use_cache:
                    rows = (view_of[idx], idx)
                    fwd = cached_batch(feats, rows, pair, lam, nfz, device)
                    # the int8 pass starts from the same photos' and views' int8 prefix features
                    fwd_q = fwd if feats_q is None else cached_batch(feats_q, rows, pair, lam, nfz, device)
                else:
                    rng = random.Random(f"{tc.seed}:{epoch}:{step}")
                    imgs = np.stack([load_view(train.samples[i], mc.image_size, 2 + rng.randrange(1 << 20), tc.seed)
                                     for i in idx.tolist()])
                    x = normalize_uint8(torch.from_numpy(imgs).permute(0, 3, 1, 2)).to(device)
                    if pair is not None:
                        x = lam * x + (1 - lam) * x[pair]
                    fwd = fwd_q = (x, 0, None)
                rng_before = rng_snapshot(device) if tc.int8_consistency > 0 else None
                logps = net(*fwd, aux)
                y = labels[idx].to(device)
                ctx = LossContext(model, logps, y, aux, tax, tc.label_smoothing)
                if teacher is not None:
                    aux["teacher"] = teacher(idx, view_of[idx] if use_cache else None)
                loss = sum(weights.get(n, 1.0) * fn(ctx) for n, fn in loss_fns.items())
                if pair is not None:  # losses are linear in the target: mix them instead of the labels
                    # the teacher's targets are per image like the labels: the partner's travel with its label
                    aux_b = aux if teacher is None else {**aux, "teacher": {
                        **aux["teacher"], "logps": [t[pair] for t in aux["teacher"]["logps"]]}}
                    ctx_b = LossContext(model, logps, y[pair], aux_b, tax, tc.label_smoothing)
                    loss = lam * loss + (1 - lam) * sum(weights.get(n, 1.0) * fn(ctx_b) for n, fn in loss_fns.items())
                if rng_before is not None:  # label-free: the mixed input's own fp32 answer is the target
                    loss = loss + tc.int8_consistency * consistency_loss(model, logps, fwd_q, {}, rng_before, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
            running += loss.item()
            bar.set_postfix(loss=f"{running / (step + 1):.3f}")
        metrics = {}
        if main_rank:
            with ema.swapped(model) if ema is not None else contextlib.nullcontext():
                for name, d in evals.items():
                    lp = predict_logprobs(model, d, mc.image_size, feats=evfeats[name] if evfeats else None,
                                          start=nfz, device=device)
                    metrics[name] = compute_metrics(tax, lp, d.labels())
            rec = {"epoch": epoch, "loss": running / steps_per_epoch, "seconds": time.time() - t0, "eval": metrics}
            history.append(rec)
            log(f"epoch {epoch + 1}/{tc.epochs} loss={rec['loss']:.3f} {rec['seconds']:.0f}s " +
                " | ".join(f"{k}: {format_metrics(v)}" for k, v in metrics.items()))
            ckpt.save_training_state(out, model, opt, sched, epoch, history, ema=ema)
        if world > 1:
            dist.barrier()
    sync = None
    if world > 1:
        # record every rank's parameter digest: DDP must leave all replicas identical. (BatchNorm
        # running statistics are buffers, refreshed from rank 0 at each forward; rank 0's are saved.)
        h = hashlib.sha256()
        for k, v in sorted(model.named_parameters()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        digests = [None] * world
        dist.all_gather_object(digests, h.hexdigest())
        sync = {"world_size": world, "backend": dist.get_backend(), "weight_sha256_per_rank": digests}
    if main_rank:
        model.cpu()
        if ema is not None:  # the saved model is the weight average (what was evaluated)
            model.load_state_dict(ema.shadow, strict=False)
        extra = {"train": asdict(tc), "history": history, "metrics": metrics,
                 "wall_seconds": sum(h["seconds"] for h in history), "distributed": sync}
        ckpt.save_model(model, mc, tax, out, extra)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        log(f"wrote {out / 'model.safetensors'} (+ config.json, taxonomy.json, metrics.json)")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics
