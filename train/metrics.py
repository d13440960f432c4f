"""Hierarchical metrics, one module used by training, evaluation, export parity and benchmarks.

`top1/<level>`: the tree-consistent path (sdk.TreeDecoder); `argmax_top1/<level>`: each head's own argmax;
`consistency`: share of images whose per-level argmaxes form a legal path; `mistake_severity`: mean LCA height
of wrong fine answers; `hP`/`hR`/`hF1`: hierarchical precision / recall / F1 over node sets. Label -1: not
labelled at that level.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sdk import Taxonomy, TreeDecoder, lca_height


def consistency_rate(taxonomy: Taxonomy, paths: np.ndarray) -> float:
    ok = np.ones(len(paths), bool)
    for lvl in range(1, taxonomy.depth):
        parent = np.asarray(taxonomy.parent_index(lvl))
        ok &= parent[paths[:, lvl]] == paths[:, lvl - 1]
    return float(ok.mean()) if len(paths) else float("nan")


def hierarchical_prf(pred_paths: Sequence[Sequence[int]], true: np.ndarray) -> tuple[float, float, float]:
    inter = npred = ntrue = 0
    for p, t in zip(pred_paths, true):
        tset = {(l, int(i)) for l, i in enumerate(t) if i >= 0}
        pset = {(l, int(i)) for l, i in enumerate(p)}
        inter += len(pset & tset)
        npred += len(pset)
        ntrue += len(tset)
    hp = inter / npred if npred else 0.0
    hr = inter / ntrue if ntrue else 0.0
    return hp, hr, (2 * hp * hr / (hp + hr) if hp + hr else 0.0)


def compute_metrics(taxonomy: Taxonomy, logprobs: Sequence[np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """All metrics for per-level log-probs (list of (N, n_level)) against labels (N, depth)."""
    labels = np.asarray(labels)
    names = taxonomy.level_names
    paths = TreeDecoder(taxonomy).paths(logprobs)
    amax = np.stack([np.asarray(lp).argmax(1) for lp in logprobs], 1)
    out: dict[str, float] = {"n": float(len(labels))}
    for lvl, name in enumerate(names):
        m = labels[:, lvl] >= 0
        out[f"top1/{name}"] = float((paths[m, lvl] == labels[m, lvl]).mean()) if m.any() else float("nan")
        out[f"argmax_top1/{name}"] = float((amax[m, lvl] == labels[m, lvl]).mean()) if m.any() else float("nan")
    full = (labels >= 0).all(1)
    out["full_path"] = float((paths[full] == labels[full]).all(1).mean()) if full.any() else float("nan")
    out["consistency"] = consistency_rate(taxonomy, amax)
    wrong = full & (paths[:, -1] != labels[:, -1])
    out["fine_errors"] = float(wrong.sum())
    out["mistake_severity"] = float(lca_height(paths[wrong], labels[wrong]).mean()) if wrong.any() else 0.0
    hp, hr, hf = hierarchical_prf(paths, labels)
    out.update({"hP": hp, "hR": hr, "hF1": hf})
    return out


def format_metrics(m: dict[str, float]) -> str:
    keys = [k for k in m if k.startswith("top1/")] + ["full_path", "consistency", "mistake_severity", "hF1"]
    return "  ".join(f"{k}={m[k]:.4f}" for k in keys if k in m)
