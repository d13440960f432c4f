"""The statistics of a benchmark: agreement between rows, confusions, calibration, back-off coverage,
the Pareto front, intervals, and the speed goals."""

from __future__ import annotations

from typing import Any

import numpy as np

from .measure import BenchmarkError, Row


def agreement(rows: list[Row], reference: str | None, taxonomy) -> None:
    """Per row, fine top-1 (and path) agreement with the PyTorch fp32 row of the same checkpoint, else `reference`."""
    from .._common import parity

    by_label = {r.entry.label: r for r in rows}
    if reference is not None and reference not in by_label:
        raise BenchmarkError(f"--reference {reference!r} is not a row; rows: {', '.join(by_label)}")
    torch_by_sha = {r.record["checkpoint_sha256"]: r for r in rows if r.entry.kind == "torch" and r.logprobs is not None}
    fine = taxonomy.level_names[-1]
    for r in rows:
        if r.logprobs is None:
            continue
        ref = torch_by_sha.get(r.record.get("checkpoint_sha256"))
        why = "PyTorch fp32 of the same checkpoint"
        if ref is None and reference is not None:
            ref, why = by_label[reference], f"--reference {reference}"
        if ref is None or ref is r:
            r.record["agreement"] = None
            r.record["agreement_note"] = ("is the reference" if ref is r else
                                          "no PyTorch entry for this checkpoint (pass --torch NAME=DIR or --reference)")
            continue
        p = parity(ref.logprobs, r.logprobs, taxonomy)
        r.record["agreement"] = {"reference": ref.entry.label, "why": why, "fine": p[f"agreement/{fine}"],
                                 "path": p["agreement/path"], **p}


def confused_pairs(paths: np.ndarray, labels: np.ndarray, taxonomy, top: int = 10) -> dict[str, list[dict[str, Any]]]:
    """Per level, the `top` most frequent (true -> predicted) confusions of the consistent path."""
    out = {}
    for l, name in enumerate(taxonomy.level_names):
        m = (labels[:, l] >= 0) & (paths[:, l] != labels[:, l])
        pairs: dict[tuple[int, int], int] = {}
        for t, p in zip(labels[m, l], paths[m, l]):
            pairs[(int(t), int(p))] = pairs.get((int(t), int(p)), 0) + 1
        best = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        out[name] = [{"true": taxonomy.node(l, t).name, "predicted": taxonomy.node(l, p).name, "count": c,
                      "share_of_true": c / max(int((labels[:, l] == t).sum()), 1)} for (t, p), c in best]
    return out


def reliability(probs: np.ndarray, correct: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Reliability bins (confidence vs accuracy) and the expected calibration error of one level."""
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    conf, acc, count = [], [], []
    for b in range(bins):
        m = idx == b
        count.append(int(m.sum()))
        conf.append(float(probs[m].mean()) if m.any() else float("nan"))
        acc.append(float(correct[m].mean()) if m.any() else float("nan"))
    n = max(len(probs), 1)
    ece = float(sum(c / n * abs(a - f) for c, a, f in zip(count, acc, conf) if c))
    return {"edges": edges.tolist(), "confidence": conf, "accuracy": acc, "count": count, "ece": ece}


def coverage_curves(probs: np.ndarray, correct: np.ndarray, n_thresholds: int = 101) -> dict[str, Any]:
    """Back-off sweeps of one global threshold t.

    `fine`: answer the fine node only when its marginal >= t (coverage = share answered, precision =
    share of those right). `backoff`: the same t at every level, the answer stops at the deepest level
    that clears it (coverage = answered nodes / all nodes, precision = answered nodes that are right).
    """
    from sdk import answered_depth

    depth = probs.shape[1]
    ts = np.linspace(0, 1, n_thresholds)
    fine_cov, fine_prec, bo_cov, bo_prec, full_cov = [], [], [], [], []
    for t in ts:
        a = probs[:, -1] >= t
        fine_cov.append(float(a.mean()))
        fine_prec.append(float(correct[a, -1].mean()) if a.any() else float("nan"))
        d = answered_depth(probs, [t] * depth)
        ans = np.arange(depth)[None, :] < d[:, None]
        bo_cov.append(float(ans.mean()))
        full_cov.append(float((d == depth).mean()))
        bo_prec.append(float(correct[ans].mean()) if ans.any() else float("nan"))
    return {"threshold": ts.tolist(), "fine": {"coverage": fine_cov, "precision": fine_prec},
            "backoff": {"coverage": bo_cov, "precision": bo_prec, "coverage_to_fine": full_cov}}


def coverage_at(curve: dict[str, Any], precision: float) -> float:
    """Largest coverage whose precision reaches `precision` (0.0 if none)."""
    c, p = np.asarray(curve["coverage"]), np.asarray(curve["precision"], dtype=float)
    ok = np.nan_to_num(p, nan=0.0) >= precision
    return float(c[ok].max()) if ok.any() else 0.0


def analyse(row: Row, taxonomy, labels: np.ndarray) -> dict[str, Any]:
    """Confusions, reliability per level and back-off curves of one measured row (from its log-probs)."""
    from sdk import decode_set

    ds = decode_set(taxonomy, row.logprobs, labels)
    full = (labels >= 0).all(1)
    paths, probs, lab = ds.paths[full], ds.probs[full], labels[full]
    correct = paths == lab
    rel = {name: reliability(probs[:, l], correct[:, l]) for l, name in enumerate(taxonomy.level_names)}
    cov = coverage_curves(probs, correct)
    return {"confused": confused_pairs(ds.paths, labels, taxonomy), "reliability": rel, "coverage": cov}


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (lower latency x and higher accuracy y), sorted by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson interval of an accuracy measured on n images."""
    if n <= 0:
        return float("nan"), float("nan")
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return float(c - h), float(c + h)


INT8_RATIO_BAR = 0.5   # the shipped int8 student at most half the flat fp32 peer's latency
FP32_RATIO_BAR = 1.15  # the fp32 student at most 15 % slower than the flat fp32 peer


def goals(rows: list[Row], student: str | None, peer: str | None, max_ms: float, taxonomy) -> dict[str, Any] | None:
    """The speed bars: the student's fastest int8 artifact within `max_ms` at batch 1, faster than the
    peer's fastest fp32 artifact, at least as accurate at the fine level, and its latency ratio to the
    peer (int8 ≤ 0.5×; the student's own fp32 ≤ 1.15×), all from this one run."""
    if not student:
        return None
    fine = f"top1/{taxonomy.level_names[-1]}"
    ok = [r for r in rows if r.record.get("status") == "ok" and r.entry.kind == "artifact"]
    cand = [r for r in ok if r.entry.group == student and r.entry.precision == "int8"]
    if not cand:
        return {"student": student, "error": f"no measured int8 artifact of {student!r}"}
    s = min(cand, key=lambda r: r.record["latency"]["median_ms"])
    res: dict[str, Any] = {"student": s.entry.label, "student_ms": s.record["latency"]["median_ms"],
                           "student_fine": s.record["metrics"][fine], "max_ms": max_ms}
    res["within_max_ms"] = res["student_ms"] <= max_ms
    if peer:
        pc = [r for r in ok if r.entry.group == peer and r.entry.precision == "fp32"]
        if not pc:
            res["error"] = f"no measured fp32 artifact of {peer!r}"
            return res
        q = min(pc, key=lambda r: r.record["latency"]["median_ms"])
        res.update({"peer": q.entry.label, "peer_ms": q.record["latency"]["median_ms"],
                    "peer_fine": q.record["metrics"][fine]})
        res["faster_than_peer"] = res["student_ms"] < res["peer_ms"]
        res["at_least_as_accurate"] = res["student_fine"] >= res["peer_fine"]
        res["ratio"] = res["student_ms"] / res["peer_ms"]
        res["ratio_bar"] = INT8_RATIO_BAR
        sf = [r for r in ok if r.entry.group == student and r.entry.precision == "fp32"]
        if sf:
            f = min(sf, key=lambda r: r.record["latency"]["median_ms"])
            res.update({"student_fp32": f.entry.label, "student_fp32_ms": f.record["latency"]["median_ms"],
                        "fp32_ratio": f.record["latency"]["median_ms"] / res["peer_ms"],
                        "fp32_ratio_bar": FP32_RATIO_BAR})
    return res
