"""Losses as named, registered components (`--losses ce,cluster,tree`, `--loss-weights cluster=0.1`).
Each receives a `LossContext`: the model, per-level log-probs, labels (-1: not labelled at that level),
the `aux` dict the model filled and the taxonomy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from sdk import Registry, Taxonomy


@dataclass
class LossContext:
    model: torch.nn.Module
    logps: list[torch.Tensor]
    labels: torch.Tensor
    aux: dict
    taxonomy: Taxonomy
    smoothing: float = 0.1


_LOSSES: Registry = Registry("loss")
register_loss, get_loss, list_losses = _LOSSES.register, _LOSSES.get, _LOSSES.names


def parse_weights(spec: str) -> dict[str, float]:
    """"cluster=0.1,tree=1" -> {"cluster": 0.1, "tree": 1.0}."""
    pairs = (part.partition("=") for part in spec.split(",") if part.strip())
    return {k.strip(): float(v) for k, _, v in pairs}


@register_loss("ce")
def hier_ce(ctx: LossContext) -> torch.Tensor:
    """Sum over levels of label-smoothed NLL; label -1 (unlabelled at that level) is skipped."""
    total = ctx.logps[0].new_zeros(())
    for lvl, lp in enumerate(ctx.logps):
        y = ctx.labels[:, lvl]
        m = y >= 0
        if not m.any():
            continue
        lpm = lp[m].float()
        nll = -lpm.gather(1, y[m, None]).squeeze(1)
        total = total + ((1 - ctx.smoothing) * nll - ctx.smoothing * lpm.mean(1)).mean()
    return total


@register_loss("fine_ce")
def fine_ce(ctx: LossContext) -> torch.Tensor:
    """Cross-entropy on the finest level only (what a flat classifier is trained with)."""
    return hier_ce(replace(ctx, logps=ctx.logps[-1:], labels=ctx.labels[:, -1:]))


@register_loss("global_ce")
def global_ce(ctx: LossContext) -> torch.Tensor:
    """Deep supervision of the flat read-out (`global_head`): `ce` on its logits alone. Trained only
    through the sum, the query path can carry the whole decision and overfit the training days; this makes the
    pooled read-out a classifier of its own, and the queries learn a refinement on top of it."""
    glob = ctx.aux.get("global_logits")
    if glob is None:
        raise ValueError("the global_ce loss needs a model with global_head=true")
    logps = [F.log_softmax(g.float(), dim=-1) for g in glob]
    return hier_ce(replace(ctx, logps=logps))


def deepest_labelled(labels: torch.Tensor) -> torch.Tensor:
    """Deepest labelled level per row (-1: unlabelled); labels are top-down (-1 below)."""
    return (labels >= 0).long().cumprod(1).sum(1) - 1


@register_loss("tree")
def tree_loss(ctx: LossContext) -> torch.Tensor:
    """HRN's probabilistic label-relation-tree loss: a legal root-to-leaf path scores the sum of its
    nodes' log-probs, normalized over all paths; each image is scored at its deepest labelled level, so
    coarse-only images invent no fine target."""
    anc = torch.tensor(ctx.taxonomy.ancestor_matrix(), device=ctx.labels.device).T  # (depth, n_leaves)
    score = sum(lp.float()[:, anc[l]] for l, lp in enumerate(ctx.logps))  # (B, n_leaves)
    log_z = torch.logsumexp(score, 1)
    total = score.new_zeros(())
    n = 0
    deepest = deepest_labelled(ctx.labels)
    for lvl in range(ctx.taxonomy.depth):
        m = deepest == lvl
        if not m.any():
            continue
        target = ctx.labels[m, lvl]
        under = anc[lvl][None, :] == target[:, None]  # leaves below the labelled node
        node_score = torch.logsumexp(score[m].masked_fill(~under, float("-inf")), 1)
        total = total + (log_z[m] - node_score).sum()
        n += int(m.sum())
    return total / max(n, 1)


@register_loss("cluster")
def cluster_loss(ctx: LossContext) -> torch.Tensor:
    """HSQ-FT cluster loss on the class queries: push the queries of different classes of a level
    apart (squared hinge on cosine similarity above 0.2), and pull each image's pooled token towards
    the query of its class (1 - cosine)."""
    head = getattr(ctx.model, "head", None)
    if head is None or not hasattr(head, "queries"):
        raise ValueError("the cluster loss needs a model with class queries (arch hsq_*)")
    total = ctx.logps[0].new_zeros(())
    pooled = F.normalize(ctx.aux["pooled"].float(), dim=-1)
    for lvl, q in enumerate(head.queries):
        qn = F.normalize(q.float(), dim=-1)
        sim = qn @ qn.T
        off = ~torch.eye(len(q), dtype=torch.bool, device=q.device)
        if off.any():
            total = total + F.relu(sim[off] - 0.2).pow(2).mean()
        y = ctx.labels[:, lvl]
        m = y >= 0
        if m.any():
            total = total + (1 - (pooled[m] * qn[y[m]]).sum(-1)).mean()
    return total / len(head.queries)
