"""pt2e QAT after post-training int8, measured and never kept: `python research/qat.py`.

QAT lost: on the reference students it lowered the KL to fp32 by about 20 % at best, never decided
the `val` near-ties the bar is missed on, and one epoch at the old lr moved int8 away from fp32
(docs/results.md). It lives here with the study that measured it (research/qat_ranges.py).

Triggered per target when its PTQ artifact misses the accuracy part of the bar (fine top-1 drop
> 0.5 pt or fine agreement with fp32 < 99 % on a judging split), or for every QAT-capable target with
`--force`. For ExecuTorch and TFLite, exactly the PTQ graph is used: `torch.export` of the
DeployWrapper (uint8 NHWC in, batch dimension dynamic so training runs in batches) ->
`prepare_qat_pt2e` with the PTQ path's quantizer and layer filter (XNNPACK for ExecuTorch, litert's
PT2E quantizer for TFLite), built with `is_qat=True`, on the int8 source model (the one the PTQ
artifacts come from: bias-corrected) with BatchNorm folded into the
convs (eval statistics, as prepare_pt2e does for PTQ: BN is frozen and the trained weights are the
folded ones that deploy; `move_exported_model_to_eval` turns dropout off) -> the fused fake-quants
swapped for plain ones that train on the grid convert_pt2e writes (`unfuse_fake_quants`) -> activation
ranges: by default (`--ranges ptq`) the post-training histogram ranges of the same edges, frozen, so
step 0 computes exactly what the PTQ graph computes (`take_ranges`); or (`minmax`) min/max over the
calibration photos, then moving averages -> N epochs on real training photos (train split minus its
20 % judging slice, decoded by `sdk.prepare`, a fresh random crop + flip each epoch), loss = KL(fp32 || QAT) per level
(distillation from the fp32 model, so the int8 model learns to answer like fp32) + ce_weight * `ce`
(train.losses, the labels; 0 by default, see QATConfig), AdamW with a small lr; the backbone blocks the student was trained with frozen stay frozen
(`freeze_blocks` from the checkpoint's training config) -> observers frozen for the last epoch when
N >= 2 -> `convert_pt2e` -> the PTQ path's lowering (XNNPACK delegation asserted / litert convert with
the uint8 input asserted) -> re-measured by the same judge as PTQ.

ONNX has no pt2e path to ONNX Runtime's QDQ format, and Core ML's int8 here is weight-only (its QAT
lives in coremltools.optimize.torch, not used): for those the report says QAT is not available and
lists the float families the sensitivity pass tried instead.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from quantize._common import QuantContext, QuantizeError, TargetResult, failing_as
from quantize.bar import MAX_TOP1_DROP, MIN_AGREEMENT, agreement_within, drop_within
from quantize.calibration import ImageSet

QAT_TARGETS = ("executorch", "tflite")
# where the activation ranges of the fake-quantized graph come from (`prepare`)
RANGES = ("ptq", "minmax")


def split_summary(rec: dict[str, Any], fine: str) -> dict[str, dict[str, float]]:
    """Per split of a judged int8 record: fp32 / int8 fine top-1, the drop, agreement and KL to fp32."""
    return {split: {"fp32_fine_top1": s["fp32"][f"top1/{fine}"], "int8_fine_top1": s["int8"][f"top1/{fine}"],
                    "fine_top1_drop": s["fine_top1_drop"], "fine_agreement": s["agreement_with_fp32"][f"agreement/{fine}"],
                    "fine_kl_to_fp32": s.get("fine_kl_to_fp32")}
            for split, s in rec.get("splits", {}).items()}


@dataclass
class QATConfig:
    """How QAT fine-tunes. `images` 0: every training photo outside the 20 % judging slice."""

    epochs: int
    images: int = 0
    batch_size: int = 8
    # AdamW moves every weight by about lr per step whatever its gradient, and many folded int8 weight
    # steps are ~1e-4. On the reference student, one epoch at 1e-6 from the PTQ start lowers the `val`
    # fine KL to fp32 by ~20 % (ExecuTorch 2.28e-3 -> 1.78e-3); 1e-5 (with a min/max start) ended at
    # 1.24e-2. research/qat_ranges.py compares lrs per range scheme.
    lr: float = 1e-6
    # the bar is agreement with fp32, so distillation leads. Measured on the tiny student (40 photos,
    # 1 epoch, 96 judging photos, ExecuTorch graph in PyTorch): fine agreement with fp32 97.9 % before
    # training, 99.0 % after with KL only, 94.8 % with ce weight 0.1 (ce pulls answers towards the
    # labels, away from fp32). ce is still computed and logged; --ce-weight turns it on.
    ce_weight: float = 0.0
    kd_weight: float = 1.0  # KL(fp32 || QAT) summed over levels
    freeze_blocks: int = 0  # backbone blocks [0, freeze_blocks) and, when > 0, the stem are not trained
    seed: int = 0
    # random crop (55-100 % of the area) + flip of each decoded photo, fresh every epoch: the bar is
    # agreement on photos the model never saw, where fp32 is least sure; on the exact training photos
    # the fp32 answers are memorized and the KL to them carries little signal
    augment: bool = True
    force: bool = False  # QAT every QAT-capable target even when its PTQ meets the bar
    # "ptq": the activation ranges are the post-training histogram ranges, frozen (step 0 is the PTQ
    # artifact's arithmetic); "minmax": min/max over the calibration photos, then moving averages
    ranges: str = "ptq"

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"QAT needs at least one epoch (--epochs {self.epochs})")
        if self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"QAT batch size {self.batch_size} / lr {self.lr}: both must be positive")
        if self.freeze_blocks < 0:
            raise ValueError(f"QAT freeze_blocks {self.freeze_blocks}: must be >= 0")
        if self.ranges not in RANGES:
            raise ValueError(f"QAT ranges {self.ranges!r}: choose from {', '.join(RANGES)}")


def accuracy_misses(rec: dict[str, Any], fine: str, max_top1_drop: float, min_agreement: float) -> list[str]:
    """Why a judged PTQ record misses the accuracy part of the bar (empty: it meets it). Size is not
    QAT's business: QAT cannot make the file smaller."""
    out = []
    for split, s in rec.get("splits", {}).items():
        if not drop_within(s["fine_top1_drop"], max_top1_drop):
            out.append(f"{split}: fine top-1 drop {100 * s['fine_top1_drop']:.2f} pt > {100 * max_top1_drop:.1f} pt")
        agr = s["agreement_with_fp32"][f"agreement/{fine}"]
        if not agreement_within(agr, min_agreement):
            out.append(f"{split}: fine agreement with fp32 {100 * agr:.2f} % < {100 * min_agreement:.0f} %")
    return out


def training_set(data: str, size: int, taxonomy, n: int = 0, seed: int = 0) -> ImageSet:
    """Real training photos for QAT: the train split minus its 20 % stratified judging slice (which
    must never be trained on), spread over fine classes, decoded exactly as the SDK decodes."""
    from quantize.calibration import _decode, _spread
    from sdk import load_dataset, stratified_holdout

    ds = load_dataset(data, "train", taxonomy=taxonomy)
    keep, _ = stratified_holdout(ds, 0.2, seed=0)
    idx = _spread(keep, ds.labels(), n, seed) if n else sorted(keep)
    return _decode(ds, idx, size, "QAT training")


# parameter names in the exported graph keep the module path: model.backbone._blocks.3._bn1.weight
_BN = re.compile(r"\._bn\d+\.")
_EARLY = re.compile(r"^model\.backbone\.(?:_conv_stem\.|_blocks\.(\d+)\.)")


def _trainable(name: str, freeze_blocks: int) -> bool:
    if _BN.search(name):
        return False  # BatchNorm frozen (it is folded before prepare; this guards an unfolded one)
    m = _EARLY.match(name)
    if m is None:
        return True
    if m.group(1) is None:  # the stem: frozen with any frozen block, trained when nothing is frozen
        return freeze_blocks == 0
    return int(m.group(1)) >= freeze_blocks


def _kl(teacher: tuple[torch.Tensor, ...], student: tuple[torch.Tensor, ...]) -> torch.Tensor:
    # clamp: masked classes may carry -inf log-probs in both, and -inf - -inf is nan
    tot = student[0].new_zeros(())
    for t, s in zip(teacher, student):
        t, s = t.clamp_min(-80.0), s.clamp_min(-80.0)
        tot = tot + (t.exp() * (t - s)).sum(1).mean()
    return tot


def augment_batch(x: torch.Tensor, rng: np.random.Generator, scale=(0.55, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Per image: a random crop of `scale` of the area (aspect in `ratio`) resized back, random h-flip.
    uint8 NHWC in and out (the deployed input type)."""
    b, h, w, _ = x.shape
    out = torch.empty_like(x)
    for i in range(b):
        area = rng.uniform(*scale)
        r = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        cw, ch = min(w, max(8, round(w * np.sqrt(area * r)))), min(h, max(8, round(h * np.sqrt(area / r))))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = x[i, top:top + ch, left:left + cw].permute(2, 0, 1)[None].float()
        img = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
        if rng.random() < 0.5:
            img = img.flip(1)
        out[i] = img.round().clamp(0, 255).to(torch.uint8)
    return out


def prepare(ctx: QuantContext, make_quantizer: Callable[[bool], Any], ranges: str = "ptq") -> torch.fx.GraphModule:
    """export (dynamic batch) -> prepare_qat_pt2e(make_quantizer(True)) -> eval (BN statistics and
    dropout frozen) -> ranges initialized on the real calibration photos: with `ranges` "ptq" the
    activation fake-quants take the post-training observers' ranges (make_quantizer(False), the
    histograms the PTQ artifact is calibrated with) and keep them frozen; with "minmax", min/max over
    the calibration photos, then moving averages while training (`init_ranges`)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_

    if ranges not in RANGES:
        raise QuantizeError(f"unknown QAT ranges {ranges!r}; choose from {', '.join(RANGES)}")
    example = torch.zeros(2, ctx.image_size, ctx.image_size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=1024)
    # a copy: the exported graph shares parameter storage with the model it traced, and training
    # must not move the fp32 model that is the distillation teacher and the reference of every judge,
    # nor the int8 source model the post-training artifacts come from
    # QAT starts where post-training int8 starts: the int8 source model (bias-corrected), so step 0 is
    # the PTQ model and training only has to improve on it
    student = copy.deepcopy(ctx.deploy(ctx.int8_model))
    gm = torch.export.export(student, (example,), dynamic_shapes={"image": {0: batch}}).module()
    # BatchNorm folded into the convs with its eval statistics, exactly as prepare_pt2e does for PTQ:
    # the annotated graph is the PTQ graph, BN stays frozen by construction, and the fake-quantized
    # weights QAT trains are the folded weights that deploy. (Left to prepare_qat_pt2e, every conv+bn
    # becomes the QAT conv-bn pattern, and the float-family convs then keep a computed weight after
    # convert that XNNPACK does not take.)
    _fuse_conv_bn_(gm)
    ptq = ptq_ranges(copy.deepcopy(gm), make_quantizer(False), ctx.calibration.images) if ranges == "ptq" else None
    prepared = prepare_qat_pt2e(gm, make_quantizer(True))
    # edge keys before move_exported_model_to_eval, which re-traces dropout and renames its nodes
    keys = {n.target: _edge_key(n) for n in _activation_observers(prepared)}
    move_exported_model_to_eval(prepared)
    unfuse_fake_quants(prepared)
    init_ranges(prepared, ctx.calibration_batches(25))  # weights; activations too with "minmax"
    if ptq is not None:
        take_ranges(prepared, keys, ptq)
    return prepared


def unfuse_fake_quants(prepared: torch.fx.GraphModule) -> int:
    """Replace every fused moving-average fake-quant by the plain `FakeQuantize` around the same observer.

    The fused op computes the grid it fake-quantizes with in C++, from the running min/max, without the
    observer's `eps` floor; `calculate_qparams`, which convert_pt2e writes into the artifact, applies it.
    The XNNPACK and litert weight observers floor a channel's scale at 2^-12, so for every channel with a
    folded max |w| below 127 * 2^-12 QAT trained against a finer grid than the one that deploys (on the
    reference student the stem conv's smallest step was 6.1e-5 in training, 2.4e-4 deployed). The plain
    module fake-quantizes with `calculate_qparams` itself. Returns how many were replaced.
    """
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize, FusedMovingAvgObsFakeQuantize

    n = 0
    for name, old in list(prepared.named_children()):
        if type(old) is not FusedMovingAvgObsFakeQuantize:
            continue
        obs = old.activation_post_process
        new = FakeQuantize(observer=lambda **_: obs)
        new.scale.resize_(old.scale.shape).copy_(old.scale)
        new.zero_point = old.zero_point.clone().to(new.zero_point.dtype)
        new.fake_quant_enabled.copy_(old.fake_quant_enabled)
        new.observer_enabled.copy_(old.observer_enabled)
        setattr(prepared, name, new)
        n += 1
    return n


def _activation_observers(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The observer / fake-quant call nodes on activations (not on a weight or bias attribute)."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("activation_post_process")
            and not (isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "get_attr")]


def _edge_key(n: torch.fx.Node) -> tuple[str, tuple[str, ...]]:
    # which edge of the traced graph an observer sits on: its producer and its consumers. Both
    # prepares start from copies of one exported graph, so these names are shared.
    return n.args[0].name, tuple(sorted(u.name for u in n.users))


def ptq_ranges(gm: torch.fx.GraphModule, quantizer, images: np.ndarray) -> dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The post-training activation qparams of `gm` under `quantizer`: prepare_pt2e, observe the
    calibration photos one at a time (as `quantize.executorch.convert` does for the artifacts), read
    each activation observer's (scale, zero point), keyed by its graph edge (`_edge_key`)."""
    from quantize.executorch import calibrated
    prepared = calibrated(gm, quantizer, images)
    out: dict[tuple, list] = {}
    for n in _activation_observers(prepared):
        out.setdefault(_edge_key(n), []).append(getattr(prepared, n.target).calculate_qparams())
    return out


def take_ranges(prepared: torch.fx.GraphModule, keys: dict[str, tuple], ranges: dict[tuple, list]) -> int:
    """Replace every activation fake-quant of the QAT graph by a fixed-qparams one holding the
    post-training (scale, zero point) of the same edge, so QAT starts from the PTQ model's arithmetic and
    trains the weights against the ranges that deploy; convert_pt2e then writes exactly those ranges.

    Setting `scale` on the stock module and stopping its observer is not enough: the fused moving-average
    fake-quant recomputes its qparams from its running min/max on every call, and its `calculate_qparams`
    (what convert_pt2e reads) does too. Returns how many were set; both graphs must observe the same edges.
    """
    from torchao.quantization.pt2e.fake_quantize import FixedQParamsFakeQuantize
    from torchao.quantization.pt2e.observer import FixedQParamsObserver

    want = sum(len(v) for v in ranges.values())
    if len(keys) != want:
        raise QuantizeError(f"QAT graph observes {len(keys)} activation edges, the post-training graph {want}")
    seen: dict[tuple, int] = {}
    for target, k in keys.items():
        i = seen.get(k, 0)
        seen[k] = i + 1
        if i >= len(ranges.get(k, ())):
            raise QuantizeError(f"QAT activation observer {target} on {k}: no post-training observer on that edge")
        scale, zp = ranges[k][i]
        old = getattr(prepared, target)
        obs = old.activation_post_process
        fixed = FixedQParamsFakeQuantize(observer=FixedQParamsObserver.with_args(
            scale=float(scale.reshape(-1)[0]), zero_point=int(zp.reshape(-1)[0]), dtype=old.dtype,
            qscheme=old.qscheme, quant_min=obs.quant_min, quant_max=obs.quant_max))
        fixed.disable_observer()
        setattr(prepared, target, fixed)
    return len(keys)


def init_ranges(prepared: torch.fx.GraphModule, batches) -> None:
    """Activation ranges = min/max over all the calibration photos before training starts.

    The QAT observers are moving averages (constant 0.01) of per-batch min/max: left alone, a
    calibration pass leaves them at roughly the first batch's range, and the measured start point
    was below PTQ (fine agreement 95.8 % vs 100 % on 96 photos of the tiny student). Per batch the
    averaging constant is set to 1 and the running min/max merged back, so the ranges cover every
    calibration photo, as PTQ's do; training then moves them with the usual constant.
    """
    fqs = [m for m in prepared.modules() if hasattr(getattr(m, "activation_post_process", None), "averaging_constant")]
    consts = [m.activation_post_process.averaging_constant for m in fqs]
    with torch.no_grad():
        for k, b in enumerate(batches):
            prev = [(m.activation_post_process.min_val.clone(), m.activation_post_process.max_val.clone()) for m in fqs]
            for m in fqs:
                m.activation_post_process.averaging_constant = 1.0
            prepared(torch.from_numpy(b))
            for m, (lo, hi) in zip(fqs, prev):
                o = m.activation_post_process
                if k and lo.numel() == o.min_val.numel():
                    o.min_val.copy_(torch.minimum(lo, o.min_val))
                    o.max_val.copy_(torch.maximum(hi, o.max_val))
        for m, c in zip(fqs, consts):
            o = m.activation_post_process
            o.averaging_constant = c
            if o.min_val.numel():
                scale, zp = o.calculate_qparams()
                m.scale.resize_(scale.shape).copy_(scale)
                m.zero_point.resize_(zp.shape).copy_(zp)


def train(prepared: torch.fx.GraphModule, ctx: QuantContext, photos: ImageSet, cfg: QATConfig,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune the fake-quantized graph on real photos: ce on labels + KL to the fp32 model."""
    from torchao.quantization.pt2e import disable_observer

    from train.losses import LossContext, get_loss

    ce = get_loss("ce")
    teacher = ctx.deploy()
    params = []
    n_frozen = 0
    for name, p in prepared.named_parameters():
        keep = _trainable(name, cfg.freeze_blocks)
        p.requires_grad_(keep)
        if keep:
            params.append(p)
        else:
            n_frozen += p.numel()
    if not params:
        raise QuantizeError("QAT: no trainable parameter left in the prepared graph (check freeze_blocks)")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    labels = torch.from_numpy(np.asarray(photos.labels)).long()
    history = []
    for epoch in range(cfg.epochs):
        if cfg.epochs >= 2 and epoch == cfg.epochs - 1:
            prepared.apply(disable_observer)  # last epoch: ranges fixed, weights adapt to them
        t0 = time.time()
        order = rng.permutation(len(photos))
        sums = np.zeros(3)
        steps = 0
        for i in range(0, len(order), cfg.batch_size):
            idx = np.sort(order[i:i + cfg.batch_size])
            x = torch.from_numpy(np.ascontiguousarray(photos.images[idx]))
            if cfg.augment:
                x = augment_batch(x, rng)
            depth = ctx.taxonomy.depth  # the deploy graph's outputs: the levels, then the embedding
            with torch.no_grad():
                t_lp = teacher(x)[:depth]
            s_lp = prepared(x)[:depth]
            l_ce = ce(LossContext(model=None, logps=list(s_lp), labels=labels[idx], aux={}, taxonomy=ctx.taxonomy))
            l_kd = _kl(t_lp, s_lp)
            loss = cfg.ce_weight * l_ce + cfg.kd_weight * l_kd
            if not torch.isfinite(loss):
                raise QuantizeError(f"QAT: non-finite loss at epoch {epoch + 1} step {steps} (ce {float(l_ce)}, "
                                    f"kl {float(l_kd)}); lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += (float(loss.detach()), float(l_ce.detach()), float(l_kd.detach()))
            steps += 1
        rec = {"epoch": epoch + 1, "loss": sums[0] / steps, "ce": sums[1] / steps, "kl_to_fp32": sums[2] / steps,
               "steps": steps, "observers": _observer_state(cfg, epoch),
               "seconds": round(time.time() - t0, 1)}
        history.append(rec)
        log(f"  qat epoch {epoch + 1}/{cfg.epochs}: loss {rec['loss']:.4f} (ce {rec['ce']:.4f}, KL to fp32 "
            f"{rec['kl_to_fp32']:.4f}), {steps} steps, {rec['seconds']} s")
    return {"trainable_params": int(sum(p.numel() for p in params)), "frozen_params": int(n_frozen),
            "history": history}


def _observer_state(cfg: QATConfig, epoch: int) -> str:
    if cfg.epochs >= 2 and epoch == cfg.epochs - 1:
        return "frozen"
    return "activations frozen at the post-training ranges, weights updating" if cfg.ranges == "ptq" else "updating"


def _ranges_words(cfg: QATConfig) -> str:
    return ("post-training histogram ranges, frozen" if cfg.ranges == "ptq" else
            "min/max over the calibration photos, then moving averages")


def _qat_record(cfg: QATConfig, photos: ImageSet, trained: dict[str, Any], quantizer: str) -> dict[str, Any]:
    c = asdict(cfg)
    c.pop("force")
    return {**c, "quantizer": quantizer + " (is_qat=True)", "images_source": photos.source, "n_images": len(photos),
            "loss": f"{cfg.ce_weight} * ce (train.losses) + {cfg.kd_weight} * KL(fp32 || QAT) summed over levels",
            "batchnorm": "folded into the convs with its eval statistics before prepare_qat_pt2e (frozen)",
            "activation_ranges": _ranges_words(cfg),
            **trained}


def _finished(res: TargetResult, qat: dict[str, Any]) -> tuple[TargetResult, dict[str, Any]]:
    """The QAT record in the artifact's manifest too."""
    from sdk import Manifest
    m = Manifest.load(res.int8_dir)
    m.metrics["qat"] = qat
    m.metrics["quantization"]["qat"] = {k: qat[k] for k in ("epochs", "n_images", "lr", "quantizer")}
    m.save(res.int8_dir)
    return res, qat


def _qat_artifact(target: str, ctx: QuantContext, out_dir: Path, photos: ImageSet, cfg: QATConfig,
                  fp32_size: int | None) -> tuple[TargetResult, dict[str, Any]]:
    """QAT of one target's post-training graph, lowered and finished exactly as post-training int8 is."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from quantize.executorch import finish_pte, quantized_module_names, write_pte, xnnpack_quantizer
    from quantize.tflite import finish_tflite, litert_quantizer, write_tflite

    names = quantized_module_names(ctx)
    if target == "executorch":
        make, quantizer_name = (lambda is_qat: xnnpack_quantizer(names, is_qat=is_qat)), "XNNPACKQuantizer"
    else:
        quantizer = litert_quantizer(names, is_qat=True)
        # BN is folded before prepare (see `prepare`), so litert's QAT-only conv+bn annotators have nothing
        # to match; litert-torch 0.10's also fails to build its pattern with this torchao (it hands
        # torch.export a function), so they are skipped
        quantizer.STATIC_QAT_ONLY_OPS = []
        make, quantizer_name = (lambda is_qat: quantizer if is_qat else litert_quantizer(names)), "litert PT2EQuantizer"
    ctx.log(f"{target} QAT: {quantizer_name} (is_qat) on {len(names)} Conv/Linear layers, {cfg.epochs} epoch(s) "
            f"on {len(photos)} photos")
    path = out_dir / "qat" / target / ("model.pte" if target == "executorch" else "model.tflite")
    path.parent.mkdir(parents=True, exist_ok=True)
    with failing_as(f"{target} QAT"):
        prepared = prepare(ctx, make, cfg.ranges)
        trained = train(prepared, ctx, photos, cfg, ctx.log)
        if target == "executorch":
            edge, ops = write_pte(convert_pt2e(prepared), ctx.example(), path)
        else:
            write_tflite(convert_pt2e(prepared, fold_quantize=False), quantizer, ctx.example(), path)
    scheme = (f"pt2e QAT ({cfg.epochs} epoch(s)) with {quantizer_name.replace('litert', 'litert-torch')}: int8 "
              f"symmetric per-channel weights, int8 per-tensor activations ({_ranges_words(cfg)})")
    notes = [f"{len(names)} Conv/Linear layers int8", f"QAT on {photos.source}, lr {cfg.lr}"]
    res = (finish_pte(ctx, path, edge, ops, fp32_size, scheme, notes) if target == "executorch" else
           finish_tflite(ctx, path, fp32_size, scheme, notes, versions=("litert-torch", "ai-edge-litert", "torchao")))
    return _finished(res, _qat_record(cfg, photos, trained, quantizer_name))



def run_qat(ctx: QuantContext, results: dict[str, Any], out: str | Path, data: str, cfg: QATConfig,
            judge: Callable[[TargetResult, QuantContext], dict[str, Any]], max_top1_drop: float,
            min_agreement: float, contexts: dict[str, QuantContext] | None = None) -> dict[str, dict[str, Any]]:
    """QAT for every PTQ target that misses the accuracy bar (all QAT-capable ones with cfg.force).

    Returns new report records keyed `<target>_qat`: for ExecuTorch / TFLite the judged QAT artifact
    (under `<out>/qat/<target>/`) with `qat` (how it was trained) and `ptq` (what it replaces); for
    ONNX / Core ML a record saying QAT is not available and which float families were tried.
    A target whose QAT fails gets an `error` record; the PTQ results stand either way.
    `contexts`: the context each target's post-training artifact was built from, where it is not `ctx`
    (ExecuTorch's dynamic activations); its QAT starts from the same context.
    `judge(res, ctx)`: the record of a QAT artifact, judged like post-training int8 against `ctx`'s plan.
    """
    out = Path(out)
    fine = ctx.taxonomy.level_names[-1]
    todo: dict[str, list[str]] = {}
    new: dict[str, dict[str, Any]] = {}
    for t, rec in results.items():
        if "error" in rec:
            continue
        why = accuracy_misses(rec, fine, max_top1_drop, min_agreement)
        if t in QAT_TARGETS and (why or cfg.force):
            if (contexts or {}).get(t, ctx).dynamic is None:
                todo[t] = why or ["forced (--force)"]
            else:
                new[f"{t}_qat"] = {
                    "target": f"{t}_qat", "skipped": True, "meets_bar": False, "trigger": why or ["forced (--force)"],
                    "reason": "the ExecuTorch artifact quantizes its activations per photo at run time "
                              "(--executorch-activations dynamic); QAT here trains the static scheme's calibrated ranges"}
        elif why and t not in QAT_TARGETS:
            new[f"{t}_qat"] = {
                "target": f"{t}_qat", "skipped": True, "meets_bar": False, "trigger": why,
                "reason": ("ONNX: no pt2e path to ONNX Runtime's QDQ format; QAT is not available for this target"
                           if t == "onnx" else "Core ML int8 here is weight-only; its QAT (coremltools.optimize.torch) "
                           "is not part of this pipeline"),
                "float_families_tried": [st["float"] for st in ctx.plan.steps],
                "float_families": ctx.plan.float_families}
    if not todo:
        return new
    try:
        photos = training_set(data, ctx.image_size, ctx.taxonomy, cfg.images, cfg.seed)
    except Exception as e:
        for t, why in todo.items():
            new[f"{t}_qat"] = {"target": f"{t}_qat", "error": f"QAT training photos: {type(e).__name__}: {e}",
                               "meets_bar": False, "trigger": why}
        return new
    ctx.log(f"qat: {', '.join(f'{t} ({w[0]})' for t, w in todo.items())} on {photos.source}")
    for t, why in todo.items():
        try:
            tctx = (contexts or {}).get(t, ctx)
            res, qat = _qat_artifact(t, tctx, out, photos, cfg, results[t].get("fp32_size_bytes"))
            rec = judge(res, tctx)
        except Exception as e:  # one target's QAT failing must not lose the others (nor the PTQ results)
            import traceback
            ctx.log(f"{t} QAT: FAILED: {type(e).__name__}: {e}")
            new[f"{t}_qat"] = {"target": f"{t}_qat", "error": f"{type(e).__name__}: {e}",
                               "traceback": traceback.format_exc(), "meets_bar": False, "trigger": why}
            continue
        from sdk import Manifest
        rec["target"] = f"{t}_qat"
        rec["trigger"] = why
        rec["fine_level"] = fine
        rec["qat"] = qat
        rec["ptq"] = split_summary(results[t], fine)
        m = Manifest.load(res.int8_dir)
        m.metrics["int8_evaluation"] = {k: v for k, v in rec.items()
                                        if k not in ("float_layers", "notes", "scheme", "qat")}
        m.save(res.int8_dir)
        for split, s in rec["splits"].items():
            p = rec["ptq"][split]
            ctx.log(f"{t} QAT {split}: fine top-1 {s['int8'][f'top1/{fine}']:.4f} (PTQ {p['int8_fine_top1']:.4f}, "
                    f"fp32 {p['fp32_fine_top1']:.4f}), agreement {s['agreement_with_fp32'][f'agreement/{fine}']:.4f} "
                    f"(PTQ {p['fine_agreement']:.4f})")
        new[f"{t}_qat"] = rec
    return new


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def qat_section(r: dict[str, Any]) -> list[str]:
    """QAT vs post-training int8, fine level, per target and split (empty when no QAT ran)."""
    rows = {t: rec for t, rec in r["targets"].items() if t.endswith("_qat") and "qat" in rec}
    failed = {t: rec for t, rec in r["targets"].items() if t.endswith("_qat") and "error" in rec}
    if not rows and not failed:
        return []
    lines = ["## QAT vs post-training int8", "",
             "| target | split | fp32 fine top-1 | PTQ fine top-1 | QAT fine top-1 | PTQ agreement | QAT agreement | QAT meets the bar |",
             "|---|---|---|---|---|---|---|---|"]
    for t, rec in rows.items():
        fine = rec["fine_level"]
        for split, s in rec["splits"].items():
            p = rec["ptq"].get(split, {})
            lines.append(f"| {t.removesuffix('_qat')} | {split} | {_pct(p.get('fp32_fine_top1'))} | "
                         f"{_pct(p.get('int8_fine_top1'))} | {_pct(s['int8'][f'top1/{fine}'])} | "
                         f"{_pct(p.get('fine_agreement'))} | {_pct(s['agreement_with_fp32'][f'agreement/{fine}'])} | "
                         f"{'yes' if rec['meets_bar'] else 'no'} |")
    lines.append("")
    for t, rec in rows.items():
        q = rec["qat"]
        hist = "; ".join(f"epoch {h['epoch']}: loss {h['loss']:.4f} (KL to fp32 {h['kl_to_fp32']:.4f})" for h in q["history"])
        lines.append(f"- {t}: {q['epochs']} epoch(s) on {q['images_source']}, lr {q['lr']}, batch {q['batch_size']}, "
                     f"{q['trainable_params']} trainable parameters, activation ranges: {q.get('activation_ranges', 'moving averages')}; triggered by: {'; '.join(rec['trigger'])}; {hist}")
    for t, rec in failed.items():
        lines.append(f"- {t}: QAT FAILED: `{rec['error']}`")
    return lines + [""]


def skipped_lines(r: dict[str, Any]) -> list[str]:
    """The QAT records of targets QAT cannot run on, and why."""
    lines = []
    for t, rec in r["targets"].items():
        if rec.get("skipped"):
            lines += [f"- {t}: QAT not available: {rec['reason']}; triggered by: {'; '.join(rec['trigger'])}"]
            if "float_families_tried" in rec:
                lines.append("  - float families tried instead (greedy, measured): " +
                             "; ".join(", ".join(f) or "none" for f in rec["float_families_tried"]))
    return lines + [""] if lines else []


def quantize_with_qat(checkpoint: str | Path, data: str, targets, out: str | Path, qat: dict[str, Any],
                      n_calibration: int = 300, n_sensitivity: int = 200, eval_limit: int = 0, n_parity: int = 64,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """`python -m quantize` (static ExecuTorch activations: QAT trains calibrated ranges), then QAT for the
    targets that miss the bar (`qat["force"]`: every QAT-capable one). `qat`: QATConfig fields. Writes
    report.json (post-training and `<target>_qat` records) and report.md with a QAT section."""
    import json

    from quantize import ExecuTorchRecipe
    from quantize.recipes import resolve_recipes
    from quantize.report import render_markdown
    from quantize.run import Int8Run, prepare_context
    from sdk import atomic_write

    t0 = time.time()
    recipes = resolve_recipes(targets, {"executorch": ExecuTorchRecipe("static")} if "executorch" in targets else {})
    ctx = prepare_context(checkpoint, data, targets, n_calibration, n_sensitivity, eval_limit, n_parity, log)
    Path(out).mkdir(parents=True, exist_ok=True)
    run = Int8Run(ctx, out, recipes, log)
    results = run.build_all()
    cfg = QATConfig(**{"freeze_blocks": int(ctx.conf.get("train", {}).get("freeze_blocks", 0)), **qat})
    results.update(run_qat(ctx, results, out, data, cfg, run.judge, MAX_TOP1_DROP, MIN_AGREEMENT, run.contexts))
    report = run.report(results, round(time.time() - t0, 1))
    ptq = {**report, "targets": {t: r for t, r in results.items() if not t.endswith("_qat")}}
    atomic_write(Path(out) / "report.json", json.dumps(report, indent=1, default=str))
    atomic_write(Path(out) / "report.md", render_markdown(ptq) + "\n" + "\n".join(qat_section(report) + skipped_lines(report)))
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse
    import warnings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="model directory written by `python -m train`")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--targets", default="executorch,tflite", help="comma-separated quantize targets")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=1, help="QAT epochs")
    p.add_argument("--force", action="store_true", help="QAT ExecuTorch and TFLite even when post-training int8 meets the bar")
    p.add_argument("--images", type=int, default=0, help="training photos for QAT (0: all outside the 20 %% judging slice)")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate")
    p.add_argument("--ce-weight", type=float, default=0.0, help="weight of the label loss next to the KL to fp32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ranges", choices=RANGES, default="ptq", help="activation ranges: post-training (frozen) or min/max")
    p.add_argument("--freeze-blocks", type=int, default=None,
                   help="backbone blocks [0, N) not trained (default: the checkpoint's; 0 trains every block)")
    p.add_argument("--no-augment", action="store_true", help="no random crop + flip per epoch")
    p.add_argument("--calibration-images", type=int, default=300)
    p.add_argument("--sensitivity-images", type=int, default=200)
    p.add_argument("--eval-limit", type=int, default=0)
    a = p.parse_args(argv)
    qat = {"epochs": a.epochs, "force": a.force, "images": a.images, "lr": a.lr, "ce_weight": a.ce_weight,
           "batch_size": a.batch_size, "ranges": a.ranges, "augment": not a.no_augment,
           **({} if a.freeze_blocks is None else {"freeze_blocks": a.freeze_blocks})}
    warnings.simplefilter("default")
    rep = quantize_with_qat(a.checkpoint, a.data, [t.strip() for t in a.targets.split(",") if t.strip()], a.out, qat,
                            a.calibration_images, a.sensitivity_images, a.eval_limit)
    print(f"report: {a.out}/report.md")
    return 0 if all(r.get("meets_bar") for r in rep["targets"].values() if "error" not in r) else 1


if __name__ == "__main__":
    import sys
    sys.exit(main())
