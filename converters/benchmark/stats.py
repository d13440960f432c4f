"""The statistics of a benchmark: agreement between rows, the accuracy interval, and the speed goals."""

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


def _fastest(rows: list[Row], group: str, precision: str) -> Row | None:
    """The measured artifact row of `group` at `precision` with the lowest median latency (None: there is none)."""
    cand = [r for r in rows if r.record.get("status") == "ok" and r.entry.kind == "artifact"
            and r.entry.group == group and r.entry.precision == precision]
    return min(cand, key=lambda r: r.record["latency"]["median_ms"], default=None)


def goals(rows: list[Row], student: str | None, peer: str | None, max_ms: float, taxonomy) -> dict[str, Any] | None:
    """The speed bars: the student's fastest int8 artifact within `max_ms` at batch 1, faster than the
    peer's fastest fp32 artifact, at least as accurate at the fine level, and its latency ratio to the
    peer (int8 ≤ 0.5×; the student's own fp32 ≤ 1.15×), all from this one run."""
    if not student:
        return None
    fine = f"top1/{taxonomy.level_names[-1]}"
    s = _fastest(rows, student, "int8")
    if s is None:
        return {"student": student, "error": f"no measured int8 artifact of {student!r}"}
    res: dict[str, Any] = {"student": s.entry.label, "student_ms": s.record["latency"]["median_ms"],
                           "student_fine": s.record["metrics"][fine], "max_ms": max_ms}
    res["within_max_ms"] = res["student_ms"] <= max_ms
    if peer:
        q = _fastest(rows, peer, "fp32")
        if q is None:
            res["error"] = f"no measured fp32 artifact of {peer!r}"
            return res
        res.update({"peer": q.entry.label, "peer_ms": q.record["latency"]["median_ms"],
                    "peer_fine": q.record["metrics"][fine]})
        res["faster_than_peer"] = res["student_ms"] < res["peer_ms"]
        res["at_least_as_accurate"] = res["student_fine"] >= res["peer_fine"]
        res["ratio"] = res["student_ms"] / res["peer_ms"]
        res["ratio_bar"] = INT8_RATIO_BAR
        f = _fastest(rows, student, "fp32")
        if f is not None:
            res.update({"student_fp32": f.entry.label, "student_fp32_ms": f.record["latency"]["median_ms"],
                        "fp32_ratio": f.record["latency"]["median_ms"] / res["peer_ms"],
                        "fp32_ratio_bar": FP32_RATIO_BAR})
    return res
