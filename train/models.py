"""Hierarchical query models: per level, one learnable query per class cross-attends to the backbone's multi-scale
tokens; a finer query adds its parent's attended query times a learned scale. CAMP: each finer query attends over
the coarser queries with the coarser log-probabilities added to the attention logits, so the coarser prediction
guides the finer one without forcing it. Attention is Linear projections + SDPA / matmuls: every target exports it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdk import Registry, Taxonomy

from .backbones import EfficientNetLite, create_backbone, normalize_uint8


def known_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
    """The entries of `d` that are fields of the dataclass `cls` (a config of another version may have others)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model from its safetensors (written as config.json)."""

    arch: str = "hsq_student"
    backbone: str = "efficientnet_lite0"
    image_size: int = 224
    taps: tuple[int, ...] = (10, -1)  # backbone block indices (-1: head conv) used as token scales
    tap_pool: tuple[int, ...] = ()  # per tap, average-pool factor before tokenizing (1 = none; () = all 1)
    d_model: int = 192
    heads: int = 4
    query_layers: int = 1  # cross-attention layers per level
    fusion_layers: int = 0  # self-attention blocks over the multi-scale tokens
    camp: bool = True
    ffn_mult: int = 2
    dropout: float = 0.1
    global_head: bool = False  # add a linear read-out of the pooled head features to every level's logits
    query_init: str = "random"  # "eigen": weighted eigen-image of each class's training features
    eigen_components: int = 3
    part_select: int = 0  # >0: TransFG part selection, this many most attended tokens (train/components.py)
    c2f_refine: bool = False  # Coarse2Fine attention-guided refinement (train/components.py)
    c2f_crop_block: int = 0  # C2F crops the input of this block (0: of the first trained block); = freeze_blocks

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        kw = known_fields(cls, d)
        return cls(**{**kw, **{k: tuple(kw[k]) for k in ("taps", "tap_pool") if k in kw}})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "taps": list(self.taps), "tap_pool": list(self.tap_pool)}


class Attention(nn.Module):
    """Multi-head attention. No dropout on the attention probabilities: with it CPU SDPA falls back from its
    fused kernel, and a Lite2 teacher step took about 5x as long."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        assert d % heads == 0, "d_model must be divisible by heads"
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.keep_attn, self.last_attn = False, None  # the attention map, kept for part selection / C2F

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.h, d // self.h).transpose(1, 2)

    def forward(self, xq: torch.Tensor, xkv: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._split(self.q(xq)), self._split(self.k(xkv)), self._split(self.v(xkv))
        if bias is None and not self.keep_attn:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            if bias is not None:
                logits = logits + bias
            attn = logits.softmax(-1)
            if self.keep_attn:
                self.last_attn = attn
            y = attn @ v
        b, h, n, dh = y.shape
        return self.o(y.transpose(1, 2).reshape(b, n, h * dh))


class FFN(nn.Sequential):
    def __init__(self, d: int, mult: int, dropout: float):
        super().__init__(nn.Linear(d, d * mult), nn.GELU(approximate="tanh"), nn.Dropout(dropout), nn.Linear(d * mult, d))


class CrossBlock(nn.Module):
    """Pre-norm cross-attention (queries -> tokens) + FFN."""

    def __init__(self, d: int, heads: int, mult: int, dropout: float):
        super().__init__()
        self.nq = nn.LayerNorm(d)
        self.nkv = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.nf = nn.LayerNorm(d)
        self.ffn = FFN(d, mult, dropout)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        q = q + self.attn(self.nq(q), self.nkv(kv), bias)
        return q + self.ffn(self.nf(q))


class SelfBlock(nn.Module):
    def __init__(self, d: int, heads: int, mult: int, dropout: float):
        super().__init__()
        self.n1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.n2 = nn.LayerNorm(d)
        self.ffn = FFN(d, mult, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.n1(x)
        x = x + self.attn(y, y)
        return x + self.ffn(self.n2(x))


class GroupReadout(nn.Module):
    """logit_c = <w_c, q_c> + b_c: one weight vector per class query."""

    def __init__(self, n: int, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.weight = nn.Parameter(torch.randn(n, d) * d ** -0.5)
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return (self.norm(q) * self.weight).sum(-1) + self.bias


class HierarchicalQueryHead(nn.Module):
    """The per-level query heads with coarse-to-fine fusion and CAMP, on a token sequence."""

    def __init__(self, taxonomy: Taxonomy, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.sizes = taxonomy.sizes
        self.queries = nn.ParameterList(nn.Parameter(torch.randn(n, d) * 0.02) for n in self.sizes)
        self.cross = nn.ModuleList(
            nn.ModuleList(CrossBlock(d, cfg.heads, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.query_layers))
            for _ in self.sizes)
        self.readout = nn.ModuleList(GroupReadout(n, d) for n in self.sizes)
        for lvl in range(1, taxonomy.depth):
            self.register_buffer(f"parent_{lvl}", torch.tensor(taxonomy.parent_index(lvl), dtype=torch.long),
                                 persistent=False)
        # learned scale of the parent's query added to each finer query
        self.fuse_scale = nn.Parameter(torch.full((max(taxonomy.depth - 1, 1),), 0.5))
        # CAMP per finer level: a cross block over the coarser queries (in a dict: the checkpoints' "camp.i.block")
        self.camp = nn.ModuleList(nn.ModuleDict({"block": CrossBlock(d, cfg.heads, cfg.ffn_mult, cfg.dropout)})
                                  for _ in range(taxonomy.depth - 1)) if cfg.camp else None

    def level(self, lvl: int, tokens: torch.Tensor, outs: list[torch.Tensor], logps: list[torch.Tensor],
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One level's queries and read-out logits on `tokens`, given the coarser levels' queries and
        log-probs (TransFG part selection runs the fine level again through it, sharing every weight)."""
        q = self.queries[lvl].unsqueeze(0).expand(tokens.shape[0], -1, -1)
        if lvl > 0:
            q = q + self.fuse_scale[lvl - 1] * outs[lvl - 1].index_select(1, getattr(self, f"parent_{lvl}"))
        for blk in self.cross[lvl]:
            q = blk(q, tokens)
        if lvl > 0 and self.camp is not None:  # the coarser log-probs bias the attention, (B, heads, n, n_coarse)
            q = self.camp[lvl - 1]["block"](q, outs[lvl - 1], logps[lvl - 1][:, None, None, :])
        return q, self.readout[lvl](q)

    def forward(self, tokens: torch.Tensor, aux: dict | None = None, global_logits: list | None = None):
        """Per-level log-probs (`aux` receives 'logits' and 'queries' per level). `global_logits` are added to the
        query read-out before the softmax, so CAMP's prior already includes them."""
        logps: list[torch.Tensor] = []
        logits, outs = [], []
        for lvl in range(len(self.sizes)):
            q, lg = self.level(lvl, tokens, outs, logps)
            outs.append(q)
            logits.append(lg + (global_logits[lvl] if global_logits is not None else 0))
            logps.append(F.log_softmax(logits[-1], dim=-1))
        if aux is not None:
            aux["logits"], aux["queries"] = logits, outs
        return logps


class MultiScaleTokens(nn.Module):
    """Project backbone taps to d_model tokens, add a learned scale embedding, optional fusion blocks."""

    def __init__(self, backbone: EfficientNetLite, cfg: ModelConfig):
        super().__init__()
        self.taps = tuple(cfg.taps)
        self.pool = tuple(cfg.tap_pool) or (1,) * len(self.taps)
        self.proj = nn.ModuleList(nn.Conv2d(backbone.channels(t), cfg.d_model, 1) for t in self.taps)
        self.scale_embed = nn.Parameter(torch.zeros(len(self.taps), cfg.d_model))
        self.fusion = nn.ModuleList(SelfBlock(cfg.d_model, cfg.heads, cfg.ffn_mult, cfg.dropout)
                                    for _ in range(cfg.fusion_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, feats: dict[int, torch.Tensor]) -> torch.Tensor:
        toks = []
        for i, t in enumerate(self.taps):
            f = feats[t]
            if self.pool[i] > 1:
                f = F.avg_pool2d(f, self.pool[i])
            x = self.proj[i](f).flatten(2).transpose(1, 2)
            toks.append(x + self.scale_embed[i])
        x = torch.cat(toks, 1)
        for blk in self.fusion:
            x = blk(x)
        return self.norm(x)


class BackboneModel(nn.Module):
    """A backbone without its ImageNet classifier (1.3 M params) and a head. Input: normalized float NCHW;
    `forward_from(x, start, cached, aux)` runs from block `start` with the frozen prefix's taps `cached`."""

    def __init__(self, taxonomy: Taxonomy, cfg: ModelConfig, pretrained: bool = True):
        super().__init__()
        self.cfg, self.taxonomy = cfg, taxonomy
        self.backbone = create_backbone(cfg.backbone, pretrained=pretrained)
        self.backbone._fc = None

    def forward(self, x: torch.Tensor, start: int = 0, cached: dict | None = None, aux: dict | None = None):
        return self.forward_from(x, start, cached=cached, aux=aux)


class HierarchicalQueryModel(BackboneModel):
    """Backbone + multi-scale tokens + hierarchical query head."""

    def __init__(self, taxonomy: Taxonomy, cfg: ModelConfig, pretrained: bool = True):
        super().__init__(taxonomy, cfg, pretrained)
        self.tokens = MultiScaleTokens(self.backbone, cfg)
        self.head = HierarchicalQueryHead(taxonomy, cfg)
        if cfg.global_head:
            if -1 not in cfg.taps:
                raise ValueError("global_head needs the head conv (tap -1) among the taps")
            # A flat linear read-out of the pooled head conv per level: the query heads and CAMP then
            # learn a correction on top of what a flat classifier sees, which converges faster on CPU budgets.
            self.global_head = nn.ModuleList(nn.Linear(self.backbone.head_channels, n) for n in taxonomy.sizes)
            self.global_drop = nn.Dropout(cfg.dropout * 2)
        if cfg.part_select or cfg.c2f_refine:
            from .components import setup_refinement
            setup_refinement(self)  # keep the fine attention map; C2F: orthogonal attention init

    def forward_from(self, x: torch.Tensor, start: int = 0, cached: dict[int, torch.Tensor] | None = None,
                     aux: dict | None = None):
        """Run from backbone block `start` (0: the normalized image) to per-level log-probs; `cached`: taps
        computed earlier (the frozen prefix). `aux` receives tokens, pooled, embedding, the head's logits
        and queries (and global_logits)."""
        if self.cfg.part_select or self.cfg.c2f_refine:
            from .components import refined_forward  # TransFG part selection / Coarse2Fine
            return refined_forward(self, x, start, cached, aux)
        feats = self.features(x, start, cached)
        tokens = self.tokens(feats)
        if aux is not None:
            aux["tokens"], aux["pooled"] = tokens, tokens.mean(1)
        glob = None
        if -1 in feats and (aux is not None or self.cfg.global_head):
            pooled_head = feats[-1].mean((2, 3), keepdim=True).flatten(1)  # keepdim: XNNPACK-delegable
        if aux is not None and -1 in feats:
            # The embedding (DeployWrapper, few-shot enrollment) is the pooled head conv: the fine queries exist
            # only for trained classes and the tokens only feed them, while the head conv keeps the generic
            # ImageNet directions a product the heads never saw is told apart by.
            aux["embedding"] = pooled_head
        if self.cfg.global_head:
            g = self.global_drop(pooled_head)
            glob = [lin(g) for lin in self.global_head]
            if aux is not None:
                aux["global_logits"] = glob  # for deep supervision of the flat read-out (loss global_ce)
        return self.head(tokens, aux=aux, global_logits=glob)

    def features(self, x: torch.Tensor, start: int, cached: dict[int, torch.Tensor] | None,
                 extra: tuple[int, ...] = ()) -> dict[int, torch.Tensor]:
        """The taps (and `extra` blocks' outputs) from block `start` on, the `cached` ones taken as given."""
        need = tuple(t for t in (*self.cfg.taps, *extra) if not (cached and t in cached))
        return {**(self.backbone.forward_range(x, start, need) if need else {}), **(cached or {})}

    @torch.no_grad()
    def initialize_from_data(self, labels: torch.Tensor, pooled: Callable[[list[int]], torch.Tensor],
                             per_class: int = 40) -> None:
        """Query init (query_init "eigen"): from the mean-pooled tokens z (`pooled(rows)`) of up to `per_class`
        training images under each node, q_c = mean_c + sum_{k<=K} r_k * s_k * v_k over the class's leading K
        principal directions v_k (signed to project the mean positively), their standard deviations s_k and
        explained-variance ratios r_k, rescaled to unit RMS."""
        g = torch.Generator().manual_seed(0)
        chosen: set[int] = set()
        for lvl in range(labels.shape[1]):
            for c in labels[:, lvl].unique().tolist():
                if c >= 0:
                    idx = (labels[:, lvl] == c).nonzero().flatten()
                    chosen.update(idx[torch.randperm(len(idx), generator=g)[:per_class]].tolist())
        order = sorted(chosen)
        was_training = self.training
        self.eval()
        z_all = pooled(order)
        self.train(was_training)
        lab = labels[torch.tensor(order)]
        for lvl, q in enumerate(self.head.queries):
            new = q.data.clone()
            for c in range(q.shape[0]):
                z = z_all[lab[:, lvl] == c]
                if len(z) == 0:
                    continue
                mu = z.mean(0)
                e = mu.clone()
                if len(z) > 1:
                    _, sv, vt = torch.linalg.svd(z - mu, full_matrices=False)
                    ratio = sv ** 2 / (sv ** 2).sum().clamp_min(1e-12)
                    for k in range(min(self.cfg.eigen_components, len(sv))):
                        v = vt[k] if float(vt[k] @ mu) >= 0 else -vt[k]
                        e += ratio[k] * (sv[k] / (len(z) - 1) ** 0.5) * v
                new[c] = e / e.pow(2).mean().sqrt().clamp_min(1e-6)
            q.data.copy_(new)


_ARCHS: Registry = Registry("architecture")
register_arch, list_archs = _ARCHS.add, _ARCHS.names
register_arch("hsq_student", HierarchicalQueryModel)
register_arch("hsq_teacher", HierarchicalQueryModel)


def build_model(taxonomy: Taxonomy, cfg: ModelConfig, pretrained: bool = True) -> nn.Module:
    return _ARCHS.get(cfg.arch)(taxonomy, cfg, pretrained=pretrained)


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-wise x / ||x|| in the plain ops every export target lowers (mul, sum, clamp, sqrt, div)."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True).clamp_min(eps))


class DeployWrapper(nn.Module):
    """The exported graph: uint8 NHWC RGB in; one log-probability tensor per level out, then (unless
    `embedding=False`) the L2-normalized embedding the SDK enrolls new products with: `aux["embedding"]`
    (query models) else `aux["pooled"]`."""

    def __init__(self, model: nn.Module, embedding: bool = True):
        super().__init__()
        self.model, self.embedding = model, embedding

    def forward(self, image: torch.Tensor):
        x = normalize_uint8(image.permute(0, 3, 1, 2))
        if not self.embedding:
            return tuple(self.model(x))
        aux: dict = {}
        logps = self.model(x, aux=aux)
        return (*logps, l2_normalize(aux["embedding"] if "embedding" in aux else aux["pooled"]))

    @property
    def embedding_dim(self) -> int | None:
        return self._probe[0] if self.embedding else None

    @property
    def embedding_feature(self) -> str | None:
        """Which feature the embedding is, in words."""
        return self._probe[1] if self.embedding else None

    @functools.cached_property
    def _probe(self) -> tuple[int, str]:
        # measured once on a blank image: which feature an architecture exposes is decided in its forward
        size = int(getattr(self.model.cfg, "image_size", 224))
        aux: dict = {}
        was = self.model.training
        self.model.eval()
        with torch.inference_mode():
            self.model(normalize_uint8(torch.zeros(1, 3, size, size, dtype=torch.uint8)), aux=aux)
        self.model.train(was)
        if "embedding" in aux:
            return int(aux["embedding"].shape[-1]), "pooled head conv"
        return int(aux["pooled"].shape[-1]), "aux['pooled'] of the architecture"


from . import components  # noqa: E402, F401  (registers the flat and HRN archs; it imports this module)
