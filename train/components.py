"""The seed components as registered options (docs/components.md): the "flat" and "hrn" archs, TransFG
part selection and Coarse2Fine refinement of the query models, the "contrastive" and "aal" losses.
train/models.py imports this module at its end, which registers them."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdk import Taxonomy

from .losses import LossContext, deepest_labelled, register_loss
from .models import Attention, BackboneModel, ModelConfig, register_arch


# ---- tree marginals (flat) ------------------------------------------------------------------------
class TreeMarginals(nn.Module):
    """Fine log-probs -> per-level log-probs: log of the summed fine probabilities under each node,
    as a constant 0/1 membership matrix and a matmul (no scatter/index ops: it exports everywhere)."""

    def __init__(self, taxonomy: Taxonomy):
        super().__init__()
        anc = torch.tensor(taxonomy.ancestor_matrix(), dtype=torch.long)  # (n_fine, depth)
        self.depth = taxonomy.depth
        for lvl in range(taxonomy.depth - 1):
            m = F.one_hot(anc[:, lvl], taxonomy.sizes[lvl]).float()  # (n_fine, n_lvl)
            self.register_buffer(f"member_{lvl}", m, persistent=False)

    def forward(self, fine_logp: torch.Tensor) -> list[torch.Tensor]:
        # a log-softmax: exp() needs no max-shift (amax would fall outside ExecuTorch's XNNPACK delegate)
        p = fine_logp.exp()
        out = [(p @ getattr(self, f"member_{lvl}")).clamp_min(1e-30).log() for lvl in range(self.depth - 1)]
        return out + [fine_logp]


class _PooledBackboneModel(BackboneModel):
    """A head on the pooled head conv (tap -1); `cfg.taps` is ignored."""

    def pooled(self, x: torch.Tensor, start: int = 0, cached: dict | None = None) -> torch.Tensor:
        f = cached[-1] if cached and -1 in cached else self.backbone.forward_range(x, start, (-1,))[-1]
        return f.mean((2, 3), keepdim=True).flatten(1)  # keepdim: the form XNNPACK delegates


class FlatModel(_PooledBackboneModel):
    """Flat baseline (arch "flat"): pooled head features -> dropout -> Linear over the fine classes;
    the coarser levels are their tree marginals. Train it with `--losses fine_ce`."""

    def __init__(self, taxonomy: Taxonomy, cfg: ModelConfig, pretrained: bool = True):
        super().__init__(taxonomy, cfg, pretrained)
        self.drop = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(self.backbone.head_channels, taxonomy.sizes[-1])
        self.tree = TreeMarginals(taxonomy)

    @property
    def fine_classifier(self) -> nn.Linear:
        return self.fc

    def forward_from(self, x: torch.Tensor, start: int = 0, cached: dict | None = None, aux: dict | None = None):
        """Per-level log-probs; `aux` receives 'pooled', 'fine_features' (= pooled) and 'logits' (fine)."""
        pooled = self.pooled(x, start, cached)
        logits = self.fc(self.drop(pooled))
        if aux is not None:
            aux["pooled"] = aux["fine_features"] = pooled
            aux["logits"] = [None] * (self.taxonomy.depth - 1) + [logits]
        return self.tree(F.log_softmax(logits, dim=-1))


class HRNModel(_PooledBackboneModel):
    """HRN head (arch "hrn"; Chen et al., CVPR 2022): per level a granularity-specific MLP on the pooled
    features gives h_l, combined top-down as z_0 = ReLU(h_0), z_l = ReLU(h_l + P_l z_{l-1}); a linear
    classifier per level. Train it with `--losses tree,fine_ce` (docs/components.md)."""

    def __init__(self, taxonomy: Taxonomy, cfg: ModelConfig, pretrained: bool = True):
        super().__init__(taxonomy, cfg, pretrained)
        c, d = self.backbone.head_channels, cfg.d_model
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(c, d), nn.LayerNorm(d), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(d, d))
            for _ in taxonomy.sizes)
        self.parent_proj = nn.ModuleList(nn.Linear(d, d) for _ in range(taxonomy.depth - 1))
        self.drop = nn.Dropout(cfg.dropout)
        self.classifiers = nn.ModuleList(nn.Linear(d, n) for n in taxonomy.sizes)

    @property
    def fine_classifier(self) -> nn.Linear:
        return self.classifiers[-1]

    def forward_from(self, x: torch.Tensor, start: int = 0, cached: dict | None = None, aux: dict | None = None):
        """Per-level log-probs; `aux` receives 'pooled', 'level_features', 'fine_features', 'logits'."""
        pooled = self.pooled(x, start, cached)
        zs: list[torch.Tensor] = []
        logits: list[torch.Tensor] = []
        for lvl, blk in enumerate(self.blocks):
            h = blk(pooled)
            if lvl > 0:
                h = h + self.parent_proj[lvl - 1](zs[-1])  # residual: parent-level features into the child
            zs.append(F.relu(h))
            logits.append(self.classifiers[lvl](self.drop(zs[-1])))
        if aux is not None:
            aux["pooled"], aux["level_features"], aux["fine_features"], aux["logits"] = pooled, zs, zs[-1], logits
        return [F.log_softmax(l, dim=-1) for l in logits]


register_arch("flat", FlatModel)
register_arch("hrn", HRNModel)


# ---- refinement of the query models: TransFG part selection, Coarse2Fine ------------------------
def setup_refinement(model: nn.Module) -> None:
    """Keep the fine level's last cross-attention map (both options read it); Coarse2Fine also starts
    every attention projection orthogonal with zero biases, as the C2F paper does."""
    model.head.cross[-1][-1].attn.keep_attn = True
    if model.cfg.c2f_refine:
        for m in model.modules():
            if isinstance(m, Attention):
                for lin in (m.q, m.k, m.v, m.o):
                    nn.init.orthogonal_(lin.weight)
                    nn.init.zeros_(lin.bias)


def token_saliency(attn: torch.Tensor, fine_logp: torch.Tensor) -> torch.Tensor:
    """(B, heads, n_fine, N) cross-attention -> (B, N) token saliency, averaged over the fine queries
    weighted by the (detached) predicted fine probabilities: a plain max would be dominated by the 80
    implausible class queries."""
    w = fine_logp.detach().exp()
    return (attn.sum(1) * w[:, :, None]).sum(1)


def _look(model: nn.Module, feats: dict[int, torch.Tensor], aux: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Tokens + head (+ TransFG part selection): per-level log-probs, the fine-level token saliency (B, N)."""
    head = model.head
    tokens = model.tokens(feats)
    aux["tokens"], aux["pooled"] = tokens, tokens.mean(1)
    logps = head(tokens, aux=aux)
    attn = head.cross[-1][-1].attn.last_attn  # kept by setup_refinement; overwritten by the second look
    sal = token_saliency(attn, logps[-1])
    k = model.cfg.part_select
    if k > 0:
        k = min(k, tokens.shape[1])
        idx = sal.topk(k, dim=1).indices  # not differentiable (a selection); the gather below is
        parts = tokens.gather(1, idx[:, :, None].expand(-1, -1, tokens.shape[2]))
        _, logits2 = head.level(len(logps) - 1, parts, aux["queries"], logps)
        fine = 0.5 * (aux["logits"][-1] + logits2)
        aux["part_index"], aux["part_logits"] = idx, logits2
        aux["logits"] = aux["logits"][:-1] + [fine]
        logps = logps[:-1] + [F.log_softmax(fine, dim=-1)]
    return logps, sal


def _tap_grids(model: nn.Module, feats: dict[int, torch.Tensor]) -> list[tuple[int, int, int, int]]:
    """Per tap (in token order): (token offset, grid h, grid w, effective stride)."""
    out, off = [], 0
    for t, p in zip(model.tokens.taps, model.tokens.pool):
        h, w = feats[t].shape[-2] // p, feats[t].shape[-1] // p
        out.append((off, h, w, model.backbone.reduction(t) * p))
        off += h * w
    return out


def attended_box(sal: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bounding box (y0, y1, x0, x1 fractions, (B, 4)) of the grid cells with saliency >= its mean, in
    exportable ops only; never empty, the maximum is always >= the mean."""
    a = sal.reshape(-1, h, w)
    mask = (a >= a.mean((1, 2), keepdim=True)).float()
    rows, cols = mask.amax(2), mask.amax(1)
    iy = torch.arange(h, device=sal.device, dtype=sal.dtype)
    ix = torch.arange(w, device=sal.device, dtype=sal.dtype)
    y0 = torch.where(rows > 0, iy, float(h)).amin(1)
    y1 = torch.where(rows > 0, iy, -1.0).amax(1) + 1
    x0 = torch.where(cols > 0, ix, float(w)).amin(1)
    x1 = torch.where(cols > 0, ix, -1.0).amax(1) + 1
    return torch.stack([y0 / h, y1 / h, x0 / w, x1 / w], 1)


def _interp(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n, n) bilinear resampling matrix from the span [lo, hi) (fractions) onto n cells."""
    i = torch.arange(n, device=lo.device, dtype=lo.dtype) + 0.5
    src = lo[:, None] * n + i[None, :] * ((hi - lo)[:, None]) - 0.5  # source cell-centre coordinate
    src = src.clamp(0, n - 1)
    j = torch.arange(n, device=lo.device, dtype=lo.dtype)
    return (1 - (src[:, :, None] - j[None, None, :]).abs()).clamp_min(0)


def crop_resize(x: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Crop `box` (fractions y0, y1, x0, x1 per image) of NCHW `x` and resample it bilinearly to the
    full H x W. Two batched matmuls with triangle-kernel matrices instead of grid_sample, so it is
    differentiable in x and exports to every target."""
    ry = _interp(box[:, 0], box[:, 1], x.shape[-2])
    rx = _interp(box[:, 2], box[:, 3], x.shape[-1])
    return ry[:, None] @ x @ rx.transpose(1, 2)[:, None]


def refined_forward(model: nn.Module, x: torch.Tensor, start: int, cached: dict[int, torch.Tensor] | None,
                    aux: dict | None) -> list[torch.Tensor]:
    """HierarchicalQueryModel.forward_from with part selection and/or Coarse2Fine, which crops the attended box
    of the input of block `max(start, cfg.c2f_crop_block)` (set it to `freeze_blocks` so the exported graph crops
    the cached features) and runs the rest again; the two looks' log-probs are averaged (docs/components.md)."""
    aux = {} if aux is None else aux
    cfg, bb = model.cfg, model.backbone
    crop = max(start, cfg.c2f_crop_block) if cfg.c2f_refine else start
    feats = model.features(x, start, cached, (crop - 1,) if crop > start else ())  # + the feature map to crop
    logps, sal = _look(model, feats, aux)
    if not cfg.c2f_refine:
        return logps
    grids = _tap_grids(model, feats)
    fine16 = [g for g in grids if g[3] >= 16]
    off, h, w, _ = min(fine16, key=lambda g: g[3]) if fine16 else max(grids, key=lambda g: g[3])
    box = attended_box(sal[:, off:off + h * w].detach(), h, w)
    base = feats[crop - 1] if crop > start else x
    cached2 = {t: crop_resize(feats[t], box) for t in cfg.taps if 0 <= t < crop - 1}
    need2 = tuple(t for t in cfg.taps if t not in cached2)
    feats2 = bb.forward_range(crop_resize(base, box), crop, need2)
    feats2.update(cached2)
    aux2: dict = {}
    logps2, _ = _look(model, feats2, aux2)
    aux["c2f_box"], aux["c2f_logps"], aux["c2f_aux"] = box, logps2, aux2  # c2f_aux: the second look's
    return [F.log_softmax(0.5 * (a + b), dim=-1) for a, b in zip(logps, logps2)]


# ---- losses -----------------------------------------------------------------------------------
def contrastive_loss(features: torch.Tensor, labels: torch.Tensor, margin: float = 0.4) -> torch.Tensor:
    """TransFG contrastive loss on L2-normalized features: same-class pairs cost 1 - cos, others
    max(cos - margin, 0), over the ordered pairs i != j; a pair is compared at the deepest level labelled
    in both rows (mixed granularity)."""
    z = F.normalize(features.float(), dim=-1)
    cos = z @ z.T
    deep = deepest_labelled(labels)
    common = torch.minimum(deep[:, None], deep[None, :])  # (B, B)
    lvl = common.clamp_min(0)
    same = labels.gather(1, lvl) == labels.T.gather(0, lvl)  # labels[i, lvl[i, j]] == labels[j, lvl[i, j]]
    valid = (common >= 0) & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    if not valid.any():
        return cos.new_zeros(())
    per = torch.where(same, 1 - cos, F.relu(cos - margin))
    return per[valid].mean()


register_loss("contrastive")(lambda ctx: contrastive_loss(ctx.aux["pooled"], ctx.labels))


def angular_asymmetric_loss(cos: torch.Tensor, y: torch.Tensor, s: float = 7.0, gamma_neg: float = 1.0,
                            gamma_pos: float = 0.0, clip: float = 0.05) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al., ICCV 2021) on cosine logits, one-vs-all sigmoid of s * cos; the
    negatives' probability is shifted down by `clip`, so easy negatives cost nothing; rows with y == -1
    are skipped."""
    m = y >= 0
    if not m.any():
        return cos.new_zeros(())
    cos, y = cos[m].float(), y[m]
    logit = s * cos
    target = F.one_hot(y, cos.shape[1]).bool()
    p = torch.sigmoid(logit)
    pos = -(1 - p).pow(gamma_pos) * F.logsigmoid(logit)
    pm = (p - clip).clamp_min(0)
    neg = -pm.pow(gamma_neg) * torch.log((1 - pm).clamp_min(1e-8))
    return torch.where(target, pos, neg).sum(1).mean()


def fine_cosines(ctx: LossContext) -> torch.Tensor:
    """(B, n_fine) cosines of the fine features with the class weights: for query models each class's
    own fine query (LayerNorm-ed) against its read-out weight vector; for flat/HRN the fine classifier's rows."""
    head = getattr(ctx.model, "head", None)
    if "queries" in ctx.aux and head is not None and hasattr(head, "readout"):
        ro = head.readout[-1]
        q = F.normalize(ro.norm(ctx.aux["queries"][-1]).float(), dim=-1)
        return (q * F.normalize(ro.weight.float(), dim=-1)).sum(-1)
    clf = getattr(ctx.model, "fine_classifier", None)
    if clf is None or "fine_features" not in ctx.aux:
        raise ValueError("the aal loss needs per-class queries (arch hsq_*) or a fine classifier (flat, hrn)")
    return F.normalize(ctx.aux["fine_features"].float(), dim=-1) @ F.normalize(clf.weight.float(), dim=-1).T


register_loss("aal")(lambda ctx: angular_asymmetric_loss(fine_cosines(ctx), ctx.labels[:, -1]))  # finest level
