"""Training loop for every model, one process or DDP. Inputs are fed **live** (photos decoded once, a fresh
augmented view at every step, `train.augment`) or **cached** (`freeze_blocks > 0` and `cache_views > 0`: the
frozen prefix's outputs per photo and view, `train.cache`)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sdk import Taxonomy, concat_levels

from . import checkpoint as ckpt
from .augment import Augmenter, Batch, ImageBank, draw_mix, mix, render, step_generator
from .cache import CachedFeed, FeatureCache, sha256_of, split_cached
from .backbones import normalize_uint8
from .data import HierDataset, load_dataset, load_view, relabel_coarse, stratified_holdout
from .losses import LossContext, get_loss, parse_weights
from .metrics import compute_metrics, format_metrics
from .models import ModelConfig, build_model, known_fields

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
    freeze_blocks: int = 0  # >0: freeze the first N backbone blocks (with cache_views > 0: the cached path)
    cache_views: int = 0  # >0 with freeze_blocks > 0: cache the frozen prefix's outputs for N views per photo
    seed: int = 0
    limit_per_class: int = 0  # >0: at most this many train images per finest class (tests)
    limit_val: int = 0
    threads: int = 0  # 0: torch default
    losses: str = "ce"  # registered losses, comma-separated (train.losses.list_losses())
    loss_weights: str = ""  # e.g. "cluster=0.1,tree=1"
    device: str = "auto"  # auto: cuda when available
    ema: float = 0.0  # >0: evaluate and save an exponential moving average of the weights (decay per step)
    mixup: float = 0.0  # >0: Beta(a, a) mixup of the inputs and of the losses
    cutmix: float = 0.0  # >0: Beta(a, a) CutMix; with mixup too, one of the two per step
    precision: str = "auto"  # auto | fp32 | bf16 (autocast); auto: bf16 on CUDA and on CPUs with bf16 instructions
    channels_last: bool = True  # NHWC memory format for the convolutions (about 2x faster on CPU)
    augment: str = "basic"  # live path: none | basic (crop, flip, colour jitter) | trivial (+ one TrivialAugment op)
    crop_scale: float = 0.35  # live path: smallest random-resized-crop area
    color_jitter: float = 0.3  # live path: brightness / contrast / saturation in [1 - j, 1 + j]
    decode_scale: float = 1.15  # live path: photos decoded once at image_size * decode_scale
    memory_mb: int = 6144  # live path: bound on the decoded photos in memory

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(**known_fields(cls, d))


def limit_per_class(ds: HierDataset, k: int, seed: int = 0) -> HierDataset:
    if k <= 0:
        return ds
    rng = random.Random(seed)
    by: dict[int, list[int]] = {}
    for i, s in enumerate(ds.samples):
        by.setdefault(s.labels[-1], []).append(i)
    keep = sorted(i for v in by.values() for i in rng.sample(v, min(k, len(v))))
    return ds.subset(keep)


class WeightEMA:
    """Exponential moving average of every float parameter and buffer (BatchNorm statistics too); the
    decay warms up as min(decay, (1 + n) / (10 + n)), or the freshly initialized heads would stay in the average
    (0.998 over 1,000 steps keeps 13.5 % of the random init). `swapped(model)` loads it temporarily."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
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
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in trained if n.startswith("backbone.")], "lr": tc.lr_backbone},
            {"params": [p for n, p in trained if not n.startswith("backbone.")], "lr": tc.lr}]


def _frozen_modules(model, n_blocks: int) -> list[torch.nn.Module]:
    """The stem and the first `n_blocks` blocks (nothing of them when 0: the whole network trains)."""
    bb = model.backbone
    return ([bb._conv_stem, bb._bn0] if n_blocks > 0 else []) + list(bb._blocks[:n_blocks])


def resolve_precision(name: str, device: torch.device) -> str:
    """auto -> bf16 on CUDA and on CPUs that report avx512_bf16 or amx_bf16 (fast bf16 matmuls), else fp32."""
    if name not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision {name!r}: choose auto, fp32 or bf16")
    if name != "auto":
        return name
    return "bf16" if device.type == "cuda" or cpu_flags() & {"avx512_bf16", "amx_bf16"} else "fp32"


def cpu_flags() -> set[str]:
    """The CPU feature flags that matter for training and int8 speed (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    wanted = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni"}
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split()} & wanted


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def to_input(x: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    """float 0..255 NCHW -> the normalized model input on `device`, in the training memory format."""
    x = normalize_uint8(x).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def eval_inputs(ds: HierDataset, size: int, rows, batch_size: int, device, channels_last: bool = False,
                feats: dict[str, torch.Tensor] | None = None, start: int = 0, images: torch.Tensor | None = None):
    """(x, start, cached) per batch of `rows` at the device's exact input (view 0): from cached frozen features
    (`feats`, the input of block `start`), from `images` (uint8 NHWC, decoded once, see `ImageBank`), or decoding
    each photo."""
    for i in range(0, len(rows), batch_size):
        part = torch.as_tensor(rows[i:i + batch_size])
        if feats is not None:
            x, cached = split_cached({k: v[part] for k, v in feats.items()}, device)
            yield x, start, cached
            continue
        imgs = images[part] if images is not None else torch.from_numpy(
            np.stack([load_view(ds.samples[j], size, 0, 0) for j in part.tolist()]))
        yield to_input(imgs.permute(0, 3, 1, 2).float(), device, channels_last), 0, None


@torch.inference_mode()
def predict_logprobs(model, ds: HierDataset, size: int, batch_size: int = 32,
                     feats: dict[str, torch.Tensor] | None = None, start: int = 0, progress: bool = True,
                     device="cpu", images: torch.Tensor | None = None, precision: str = "fp32",
                     channels_last: bool = False) -> list[np.ndarray]:
    """Per-level log-probs over a dataset (inputs as `eval_inputs`)."""
    model.eval()
    outs: list[list[np.ndarray]] = []
    batches = eval_inputs(ds, size, range(len(ds)), batch_size, device, channels_last, feats, start, images)
    for x, first, cached in tqdm(batches, total=math.ceil(len(ds) / batch_size), desc="evaluating", leave=False,
                                 disable=not progress):
        with autocast(torch.device(device), precision):
            outs.append([lp.float().cpu().numpy() for lp in model.forward_from(x, first, cached=cached)])
    return concat_levels(outs)


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


def select_device(name: str = "auto") -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


class LiveFeed:
    """Photos decoded once into memory, a fresh augmented view of each at every step."""

    def __init__(self, train: HierDataset, mc: ModelConfig, tc: TrainConfig, device, log=print):
        t0 = time.time()
        self.bank = ImageBank(train.samples, max(round(mc.image_size * tc.decode_scale), mc.image_size),
                              tc.memory_mb, tc.threads)
        log(f"decoded {len(train)} training photos at {self.bank.size} px in {time.time() - t0:.0f}s")
        self.aug = Augmenter(tc.augment, tc.crop_scale, tc.color_jitter)
        self.tc, self.size, self.device = tc, mc.image_size, device

    def batch(self, idx: torch.Tensor, epoch: int, step: int) -> tuple[tuple, Batch]:
        g = step_generator(self.tc.seed, epoch, step)
        views = self.aug.draw(len(idx), g)
        m = draw_mix(len(idx), self.tc.mixup, self.tc.cutmix, g)
        photos = self.bank.batch(idx)

        def render_at(size: int) -> torch.Tensor:
            return to_input(mix(render(photos, views, size), m), self.device, self.tc.channels_last)
        return (render_at(self.size), 0, None), Batch(idx, m, render=render_at)


def _loss(net, model, fwd, batch: Batch, labels, tax, tc: TrainConfig, loss_fns, weights, teacher, device):
    """The step's loss. Under mixing the losses are mixed (they are linear in the target): per-photo
    teacher targets (cached) travel with their photo's label; a live teacher saw the mixed photo itself."""
    aux: dict = {}
    logps = [lp.float() for lp in net(*fwd, aux)]
    y = labels[batch.idx].to(device)
    if teacher is not None:
        aux["teacher"] = teacher(batch)
    total = lambda ctx: sum(weights.get(n, 1.0) * fn(ctx) for n, fn in loss_fns.items())  # noqa: E731
    loss = total(LossContext(model, logps, y, aux, tax, tc.label_smoothing))
    m = batch.mix
    if m is not None:
        aux_b = aux
        if teacher is not None and batch.render is None:
            aux_b = {**aux, "teacher": {**aux["teacher"], "logps": [t[m.pair] for t in aux["teacher"]["logps"]]}}
        loss = m.lam * loss + (1 - m.lam) * total(LossContext(model, logps, y[m.pair], aux_b, tax, tc.label_smoothing))
    return loss


def _evaluate(run: Run, channels_last: bool, device, precision: str) -> dict[str, Any]:
    return {name: compute_metrics(d.taxonomy, predict_logprobs(run.model, d, run.model.cfg.image_size, device=device,
                                                               precision=precision, channels_last=channels_last,
                                                               **run.eval_inputs.get(name, {})), d.labels())
            for name, d in run.evals.items()}


def _replica_digests(model, world: int) -> dict[str, Any] | None:
    """Every rank's parameter digest: DDP must leave all replicas identical. (BatchNorm running
    statistics are buffers, refreshed from rank 0 at each forward; rank 0's are saved.)"""
    import torch.distributed as dist
    if world <= 1:
        return None
    params = sorted(model.named_parameters())
    digest = sha256_of([], *(k.encode() + v.detach().cpu().contiguous().numpy().tobytes() for k, v in params))
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    return {"world_size": world, "backend": dist.get_backend(), "weight_sha256_per_rank": digests}


@dataclass
class Run:
    """What a training run sets up once: data, model, how batches are fed."""

    tax: Taxonomy
    train: HierDataset
    evals: dict[str, HierDataset]
    model: torch.nn.Module
    feed: LiveFeed | CachedFeed
    eval_inputs: dict[str, dict[str, Any]]  # per eval split, predict_logprobs' input arguments (decoded or cached)


def _setup(mc: ModelConfig, tc: TrainConfig, out: Path, device, precision: str, world: int, main_rank: bool,
           log) -> Run:
    """Data, model (frozen prefix, memory format, query init) and the batch feed of a run."""
    import torch.distributed as dist
    torch.manual_seed(tc.seed)
    tax, train, evals = prepare_data(tc, out if main_rank else None)
    if main_rank:
        (out / "config.resolved.json").write_text(json.dumps({"model": mc.to_dict(), "train": asdict(tc)}, indent=1))
    model = build_model(tax, mc, pretrained=True)
    nfz = tc.freeze_blocks
    for m in _frozen_modules(model, nfz):
        m.requires_grad_(False)
    init_feats = None
    if nfz > 0 and tc.cache_views > 0:
        t0 = time.time()
        if world > 1 and not main_rank:
            dist.barrier()  # rank 0 builds the on-disk cache first; the others then read it
        feats = FeatureCache(model, train, mc.image_size, nfz, tc.cache_views, tc.seed).all_views()
        ev_inputs = {k: {"feats": FeatureCache(model, d, mc.image_size, nfz, 1, tc.seed).view(0), "start": nfz}
                     for k, d in evals.items()}
        if world > 1 and main_rank:
            dist.barrier()
        log(f"frozen features ready: { {k: tuple(v.shape) for k, v in feats.items()} } in {time.time() - t0:.0f}s")
        feed, init_feats = CachedFeed(feats, tc, nfz, device), {k: v[0] for k, v in feats.items()}
    else:
        feed = LiveFeed(train, mc, tc, device, log)
        ev_inputs = {k: {"images": ImageBank(d.samples, mc.image_size, tc.memory_mb, tc.threads).images}
                     for k, d in evals.items()} if main_rank else {}
    model.to(device)
    if tc.channels_last:
        model.to(memory_format=torch.channels_last)
    if mc.query_init == "eigen" and hasattr(model, "initialize_from_data"):  # same init on every rank

        def pooled(rows: list[int]) -> torch.Tensor:
            zs = []
            for x, start, cached in eval_inputs(train, mc.image_size, rows, 64, device, tc.channels_last, init_feats,
                                                nfz):
                aux: dict = {}
                with autocast(device, precision):
                    model.forward_from(x, start, cached=cached, aux=aux)
                zs.append(aux["pooled"].float().cpu())
            return torch.cat(zs)
        model.initialize_from_data(torch.as_tensor(train.labels()), pooled)
    return Run(tax, train, evals, model, feed, ev_inputs)


def _train_epoch(run: Run, net, opt, sched, ema, epoch: int, tc: TrainConfig, device, precision: str,
                 rank: int, world: int, teacher, clock: dict) -> float:
    """One epoch over this rank's shard; returns the mean loss. `clock` carries the run's img/s."""
    labels = torch.from_numpy(run.train.labels())
    weights = parse_weights(tc.loss_weights)
    loss_fns = {name: get_loss(name) for name in (l.strip() for l in tc.losses.split(",")) if name}
    steps = math.ceil(len(run.train) / (tc.batch_size * world))
    run.model.train()
    for m in _frozen_modules(run.model, tc.freeze_blocks):
        m.eval()  # frozen BatchNorm keeps its ImageNet statistics
    # the epoch's order depends only on (seed, epoch): resumable
    perm = torch.randperm(len(run.train), generator=torch.Generator().manual_seed(tc.seed * 1000 + epoch))[rank::world]
    running = 0.0
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{tc.epochs}", leave=False, disable=rank != 0)
    for step in bar:
        idx = perm[step * tc.batch_size:(step + 1) * tc.batch_size]
        if len(idx) == 0:
            idx = perm[:tc.batch_size]  # uneven shards: every rank must take the same number of steps
        fwd, batch = run.feed.batch(idx, epoch, step)
        with autocast(device, precision):
            loss = _loss(net, run.model, fwd, batch, labels, run.tax, tc, loss_fns, weights, teacher, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), 5.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(run.model)
        running += loss.item()
        clock["images"] += len(idx) * world
        rate = clock["images"] / (time.time() - clock["start"])
        left = ((tc.epochs - epoch) * steps - step - 1) * len(idx) * world / rate
        bar.set_postfix(loss=f"{running / (step + 1):.3f}", img_s=f"{rate:.1f}", eta=f"{left / 60:.0f}min")
    return running / steps


def check_recipe(mc: ModelConfig, tc: TrainConfig) -> None:
    """Refuse, before any work, a model and loss pair that would fail in the first training step."""
    if (mc.part_select or mc.c2f_refine) and "global_ce" in (name.strip() for name in tc.losses.split(",")):
        # The refined forward (part selection / Coarse2Fine) has no flat read-out for global_ce to supervise.
        raise ValueError("--part-select / --c2f-refine leave the global read-out untrained: drop global_ce from "
                         "--losses (and set --global-head false)")


def train_model(mc: ModelConfig, tc: TrainConfig, out: str | Path, resume: bool = False,
                log=print, teacher=None) -> dict[str, Any]:
    """Train, evaluate every epoch, save the model directory. Returns the final metrics per eval split.

    Under `torchrun` (WORLD_SIZE > 1): DistributedDataParallel (gloo on CPU, nccl on CUDA), each rank on its
    shard of every epoch's permutation, rank 0 evaluating and writing. `teacher`: `Batch` -> {"logps",
    "temperature"}, for distillation.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    check_recipe(mc, tc)
    out = Path(out)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = select_device(tc.device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main_rank = rank == 0
    log = log if main_rank else (lambda *a, **k: None)
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()  # `tc.threads` holds for this run only, not for the caller's process
    try:
        if tc.threads:
            torch.set_num_threads(tc.threads)
        precision = resolve_precision(tc.precision, device)
        flags = sorted(cpu_flags()) if device.type == "cpu" else [device.type]
        log(f"precision {precision} (asked {tc.precision}; {'CPU flags ' + ','.join(flags) if flags else device.type}"
            f"), {'channels_last' if tc.channels_last else 'NCHW'}, {torch.get_num_threads()} threads")
        run = _setup(mc, tc, out, device, precision, world, main_rank, log)
        model = run.model
        opt = torch.optim.AdamW(_param_groups(model, tc), weight_decay=tc.weight_decay)
        steps = math.ceil(len(run.train) / (tc.batch_size * world))
        total, warm = steps * tc.epochs, min(steps, steps * tc.epochs // 10 + 1)  # warm-up: one epoch at most
        sched = torch.optim.lr_scheduler.LambdaLR(  # per step: linear warm-up, then cosine decay to zero
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        ema = WeightEMA(model, tc.ema) if tc.ema > 0 else None
        start_epoch, history = (ckpt.load_training_state(out, model, opt, sched, ema=ema) if resume else (0, []))
        if resume and start_epoch:
            log(f"resuming after epoch {start_epoch - 1} from {out / 'checkpoint'}")
        net = DDP(model, find_unused_parameters=True) if world > 1 else model
        clock = {"start": time.time(), "images": 0}
        for epoch in range(start_epoch, tc.epochs):
            t0 = time.time()
            loss = _train_epoch(run, net, opt, sched, ema, epoch, tc, device, precision, rank, world, teacher, clock)
            if main_rank:
                with ema.swapped(model) if ema is not None else contextlib.nullcontext():
                    metrics = _evaluate(run, tc.channels_last, device, precision)
                secs = time.time() - t0
                rec = {"epoch": epoch, "loss": loss, "seconds": secs, "images_per_second": len(run.train) / secs,
                       "precision": precision, "eval": metrics}  # per epoch: a resumed run may change it
                history.append(rec)
                log(f"epoch {epoch + 1}/{tc.epochs} loss={loss:.3f} {secs:.0f}s ({len(run.train) / secs:.1f} img/s) "
                    + " | ".join(f"{k}: {format_metrics(v)}" for k, v in metrics.items()))
                ckpt.save_training_state(out, model, opt, sched, epoch, history, ema=ema)
            if world > 1:
                dist.barrier()
        sync = _replica_digests(model, world)
        metrics = history[-1]["eval"] if history else {}
        if main_rank:
            metrics = _save(run, mc, tc, out, ema, precision, flags, history, sync, log)
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return metrics
    finally:
        torch.set_num_threads(threads_before)


def _save(run: Run, mc: ModelConfig, tc: TrainConfig, out: Path, ema, precision: str, flags: list[str],
          history: list[dict], sync, log) -> dict[str, Any]:
    """Write the model directory (the weight average under --ema) with its fp32 metrics."""
    model = run.model.cpu()  # in place: `run` evaluates this model below
    if ema is not None:
        model.load_state_dict(ema.shadow, strict=False)
    model.to(memory_format=torch.contiguous_format)
    metrics = history[-1]["eval"] if history else {}
    if precision != "fp32":  # the saved figures are the fp32 ones, as the device computes them
        metrics = _evaluate(run, False, "cpu", "fp32")
        log("fp32: " + " | ".join(f"{k}: {format_metrics(v)}" for k, v in metrics.items()))
    extra = {"train": asdict(tc), "precision": precision, "cpu_flags": flags, "history": history,
             "metrics": metrics, "wall_seconds": sum(h["seconds"] for h in history), "distributed": sync}
    ckpt.save_model(model, mc, run.tax, out, extra)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    log(f"wrote {out / 'model.safetensors'} (+ config.json, taxonomy.json, metrics.json)")
    return metrics
