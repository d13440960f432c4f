"""Calibrate back-off thresholds and the out-of-catalogue cut-off of an exported model (docs/sdk.md,
"Calibration"): `python -m sdk calibrate --model DIR --data ROOT --split val --target-precision 0.98`.

Thresholds are chosen coarsest level first, each on the images answered down to the level above: the
smallest marginal t at which every stricter threshold still answers right `target_precision` of the time
(1.0 when none does). Each score in `UNKNOWN_SCORES` gets the threshold that flags `max_false_unknown` of
real items; the one that flags the most generated out-of-catalogue images wins (the Grocery Store dataset
has no photos of non-grocery objects). numpy only; research/calibration_curves.py draws the curves.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ._backends import concat_levels
from ._classifier import Classifier
from ._decode import DEFAULT_UNKNOWN_SCORE, UNKNOWN_SCORES, TreeDecoder, unknown_scores
from ._files import atomic_write
from ._manifest import MANIFEST_NAME
from .datasets import synthetic_dataset

OUT_OF_CATALOGUE_KINDS = ("uniform-noise", "gaussian-noise", "blank", "gradient", "checkerboard", "synthetic-shapes")


# ---- generated out-of-catalogue images ------------------------------------------------------------
def out_of_catalogue_images(n_per_kind: int = 12, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """(kind, uint8 HxWx3 image) pairs that are certainly not grocery items (see module docstring)."""
    rng = np.random.default_rng(seed)
    out: list[tuple[str, np.ndarray]] = []
    for i in range(n_per_kind):
        h, w = int(rng.integers(180, 480)), int(rng.integers(180, 480))
        out.append(("uniform-noise", rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        g = rng.normal(rng.uniform(60, 200), rng.uniform(10, 60), (h, w, 3))
        out.append(("gaussian-noise", np.clip(g, 0, 255).astype(np.uint8)))
        # blank frames: black, white, mid grey, then random solid colours (lens cap, wall, desk)
        fixed = [(0, 0, 0), (255, 255, 255), (128, 128, 128)]
        col = fixed[i] if i < len(fixed) else tuple(int(c) for c in rng.integers(0, 256, 3))
        out.append(("blank", np.broadcast_to(np.asarray(col, np.uint8), (h, w, 3)).copy()))
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, w)[None, :, None] if i % 2 else np.linspace(0, 1, h)[:, None, None]
        out.append(("gradient", np.broadcast_to(a + (b - a) * t, (h, w, 3)).astype(np.uint8)))
        cell = int(rng.integers(8, 64))
        yy, xx = np.mgrid[0:h, 0:w]
        mask = ((yy // cell + xx // cell) % 2).astype(bool)
        img = np.empty((h, w, 3), np.uint8)
        img[mask], img[~mask] = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        out.append(("checkerboard", img))
    shapes = synthetic_dataset("ood", per_class=max(1, n_per_kind // 8 + 1), size=224).samples
    idx = np.random.default_rng(seed).permutation(len(shapes))[:n_per_kind]
    out += [("synthetic-shapes", shapes[int(i)].source) for i in idx]
    return out


# ---- threshold selection --------------------------------------------------------------------------
def pick_threshold(p: np.ndarray, correct: np.ndarray, target: float) -> float:
    """Smallest t with precision(p >= t') >= target for every candidate t' >= t (1.0 if none)."""
    if len(p) == 0:
        return 1.0
    order = np.argsort(-p, kind="stable")
    ps, cs = p[order], correct[order].astype(np.float64)
    prec = np.cumsum(cs) / np.arange(1, len(ps) + 1)
    # with ties the threshold answers the whole tie group: evaluate at each group's last member
    last = np.r_[ps[1:] != ps[:-1], True]
    vals, prec = ps[last], prec[last]
    ok = np.minimum.accumulate(prec >= target)  # prefix (high thresholds first) where all meet the target
    if not ok[0]:
        return 1.0
    return float(vals[np.flatnonzero(ok)[-1]])


@dataclass
class DecodedSet:
    """Greedy consistent paths and their marginals for a labelled set (one row per image)."""

    paths: np.ndarray  # (N, depth) node indices
    probs: np.ndarray  # (N, depth) marginal of each path node
    labels: np.ndarray  # (N, depth), -1 = unlabelled
    unknown: dict[str, np.ndarray]  # score kind -> (N,)
    flat: np.ndarray  # (N, depth) ancestors of the finest head's own argmax (a flat classifier's answer)

    def labelled(self) -> "DecodedSet":
        """The rows labelled at every level."""
        keep = (self.labels >= 0).all(1)
        return DecodedSet(self.paths[keep], self.probs[keep], self.labels[keep],
                          {k: v[keep] for k, v in self.unknown.items()}, self.flat[keep])


def decode_set(taxonomy, logprobs: Sequence[np.ndarray], labels: np.ndarray | None = None) -> DecodedSet:
    dec = TreeDecoder(taxonomy)
    leaf, errors = dec.leaf_probs(logprobs)
    if errors:
        r, e = next(iter(errors.items()))
        raise type(e)(f"image {r} of the calibration set: {e}")
    marg = dec.node_sums(leaf)
    paths = dec.greedy_paths(marg)
    probs = np.stack([marg[l][np.arange(len(paths)), paths[:, l]] for l in range(taxonomy.depth)], 1)
    labels = np.full_like(paths, -1) if labels is None else np.asarray(labels, np.int64)
    anc = dec.anc[np.asarray(logprobs[-1]).argmax(axis=1)]
    return DecodedSet(paths, probs, labels, {k: unknown_scores(k, leaf, marg) for k in UNKNOWN_SCORES}, anc)


def answered_depth(probs: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Per row, how many levels the back-off answer keeps (0 … depth)."""
    passed = probs >= np.asarray(thresholds)[None, :]
    return np.cumprod(passed, axis=1).sum(axis=1)


def _flagged_and_depth(ds: DecodedSet, thresholds: Sequence[float], unknown_kind: str | None,
                       unknown_threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Per row, whether it is flagged unknown, and how many levels its answer keeps (0 when flagged)."""
    flagged = np.zeros(len(ds.paths), bool) if unknown_kind is None or unknown_threshold is None \
        else ds.unknown[unknown_kind] > unknown_threshold
    return flagged, np.where(flagged, 0, answered_depth(ds.probs, thresholds))


def calibrate_thresholds(ds: DecodedSet, target: float) -> list[float]:
    """Per-level thresholds, coarsest first (see module docstring)."""
    ds = ds.labelled()
    probs, correct = ds.probs, ds.paths == ds.labels
    thresholds: list[float] = []
    reach = np.ones(len(probs), bool)  # answered down to the level above
    for lvl in range(probs.shape[1]):
        thresholds.append(pick_threshold(probs[reach, lvl], correct[reach, lvl], target))
        reach &= probs[:, lvl] >= thresholds[-1]
    return thresholds


def calibrate_unknown(in_scores: dict[str, np.ndarray], ood_scores: dict[str, np.ndarray],
                      max_false_unknown: float) -> tuple[str, float, dict[str, dict[str, float]]]:
    """Pick the score kind and threshold (flag when score > threshold) as in the module docstring."""
    table: dict[str, dict[str, float]] = {}
    for kind in UNKNOWN_SCORES:
        s_in, s_out = in_scores[kind], ood_scores[kind]
        thr = float(np.quantile(s_in, 1.0 - max_false_unknown, method="higher")) if len(s_in) else 1.0
        table[kind] = {"threshold": thr, "false_unknown_rate": float((s_in > thr).mean()) if len(s_in) else 0.0,
                       "ood_detection_rate": float((s_out > thr).mean()) if len(s_out) else 0.0}
    kind = max(table, key=lambda k: (table[k]["ood_detection_rate"], k == DEFAULT_UNKNOWN_SCORE))
    return kind, table[kind]["threshold"], table


# ---- reporting ------------------------------------------------------------------------------------
def lca_height(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per row, the height of the lowest common ancestor of two (N, depth) full paths: 0 when equal,
    1 for siblings … depth when they differ at the coarsest level."""
    differ = np.asarray(pred) != np.asarray(true)
    return np.where(differ.any(axis=1), differ.shape[1] - differ.argmax(axis=1), 0).astype(np.int64)


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if np.size(x) else float("nan")


def decoding_report(ds: DecodedSet, thresholds: Sequence[float], unknown_kind: str | None,
                    unknown_threshold: float | None, level_names: Sequence[str]) -> dict[str, Any]:
    """Figures of the back-off answers vs plain argmax on a labelled set."""
    ds = ds.labelled()
    n, depth = ds.paths.shape
    unk, d = _flagged_and_depth(ds, thresholds, unknown_kind, unknown_threshold)
    correct = ds.paths == ds.labels
    answered = np.arange(depth)[None, :] < d[:, None]
    rep: dict[str, Any] = {"n": int(n), "answered_node_precision": _mean(correct[answered])}
    for l, name in enumerate(level_names):
        rep[f"coverage/{name}"] = _mean(answered[:, l])
        rep[f"precision/{name}"] = _mean(correct[answered[:, l], l])
    rep["flagged_unknown"] = _mean(unk)
    # "argmax": the full path without back-off; "flat_argmax": the finest head alone. A mistake is a wrong
    # deepest node, its severity the LCA height of the full paths (a back-off answer shares its full path's).
    h_full, h_flat = lca_height(ds.paths, ds.labels), lca_height(ds.flat, ds.labels)
    deepest_right = np.ones(n, bool)
    rows = np.flatnonzero(d > 0)
    deepest_right[rows] = correct[rows, d[rows] - 1]
    for kind, h, wrong in (("flat_argmax", h_flat, h_flat > 0), ("argmax", h_full, h_full > 0),
                           ("backoff", h_full, ~deepest_right)):
        if kind != "backoff":
            rep[f"{kind}/fine_top1"] = _mean(~wrong)
        rep[f"{kind}/mistakes"] = int(wrong.sum())
        rep[f"{kind}/mistake_severity"] = float(h[wrong].mean()) if wrong.any() else 0.0
        rep[f"{kind}/severity_per_image"] = float(h[wrong].sum() / max(n, 1))
    return rep


def ood_report(ood: DecodedSet, kinds: Sequence[str], thresholds: Sequence[float], unknown_kind: str,
               unknown_threshold: float) -> dict[str, Any]:
    flagged, d = _flagged_and_depth(ood, thresholds, unknown_kind, unknown_threshold)
    finest = d == ood.paths.shape[1]
    rep: dict[str, Any] = {"n": int(len(d)), "flagged_unknown": _mean(flagged), "answered_to_finest": _mean(finest)}
    for k in dict.fromkeys(kinds):
        m = np.asarray(kinds) == k
        rep[f"{k}/flagged_unknown"], rep[f"{k}/answered_to_finest"] = _mean(flagged[m]), _mean(finest[m])
    return rep


# ---- the whole procedure --------------------------------------------------------------------------
def batch_logprobs(clf: Classifier, sources: Sequence[Any], batch_size: int = 16,
                   progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    outs = []
    for i in range(0, len(sources), batch_size):
        batch = np.stack([clf.preprocess(s) for s in sources[i:i + batch_size]])
        outs.append(clf.logprobs(batch))
        if progress:
            progress(len(batch))
    return concat_levels(outs) if outs else [np.zeros((0, n)) for n in clf.taxonomy.sizes]


@dataclass
class Calibration:
    thresholds: list[float]
    unknown_score: str
    unknown_threshold: float
    report: dict[str, Any]
    unknown_table: dict[str, dict[str, float]]
    ood_report: dict[str, Any]

    def decoding(self, target: float, max_false_unknown: float, source: str,
                 level_names: Sequence[str]) -> dict[str, Any]:
        """The manifest's `decoding` section."""
        calibration = {"data": source, "target_precision": target, "max_false_unknown": max_false_unknown,
                       "out_of_catalogue": "generated: " + ", ".join(OUT_OF_CATALOGUE_KINDS), "report": self.report,
                       "unknown_scores": self.unknown_table, "out_of_catalogue_report": self.ood_report,
                       "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        return {"thresholds": [round(t, 6) for t in self.thresholds], "levels": list(level_names),
                "unknown_score": self.unknown_score, "unknown_threshold": round(self.unknown_threshold, 6),
                "calibration": calibration}


def calibrate(clf: Classifier, in_logprobs: Sequence[np.ndarray], labels: np.ndarray,
              ood_logprobs: Sequence[np.ndarray], ood_kinds: Sequence[str], target: float = 0.98,
              max_false_unknown: float = 0.05) -> Calibration:
    """Thresholds, unknown cut-off and figures from precomputed log-probs."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target precision must be in (0, 1]; got {target}")
    if not 0.0 <= max_false_unknown < 1.0:
        raise ValueError(f"max_false_unknown must be in [0, 1); got {max_false_unknown}")
    ds, ood = decode_set(clf.taxonomy, in_logprobs, labels), decode_set(clf.taxonomy, ood_logprobs)
    if not (ds.labels >= 0).all(1).any():
        raise ValueError("the calibration set has no image labelled at every level")
    thresholds = calibrate_thresholds(ds, target)
    kind, uthr, table = calibrate_unknown(ds.unknown, ood.unknown, max_false_unknown)
    return Calibration(thresholds, kind, uthr, decoding_report(ds, thresholds, kind, uthr, clf.taxonomy.level_names),
                       table, ood_report(ood, ood_kinds, thresholds, kind, uthr))


def write_decoding(model_dir: Path, decoding: dict[str, Any]) -> Path:
    """Replace only the manifest's `decoding` section (atomically); the artifact and its hash are untouched."""
    path = model_dir / MANIFEST_NAME if model_dir.is_dir() else model_dir
    d = json.loads(path.read_text(encoding="utf-8"))
    d["decoding"] = decoding
    return atomic_write(path, json.dumps(d, indent=1, ensure_ascii=False))
