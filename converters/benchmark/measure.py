"""The rows of a benchmark (`--artifacts`, `--torch`) and how each is timed and measured."""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .._common import run_batched, torch_logprobs

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
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

    def record(self, **kw: Any) -> dict[str, Any]:
        """The row's record: what it is, then the measured fields `kw`."""
        return {"label": self.label, "group": self.group, "kind": self.kind, "target": self.target,
                "runtime": RUNTIMES.get(self.target, self.target), "precision": self.precision,
                "path": str(self.path), **kw}


@dataclass
class Row:
    entry: Entry
    record: dict[str, Any] = field(default_factory=dict)
    logprobs: list[np.ndarray] | None = None


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")


def _split_named(item: str) -> tuple[str | None, Path]:
    name, sep, path = item.partition("=")
    return (name.strip(), Path(path.strip())) if sep else (None, Path(item.strip()))


def _artifact_entries(arg: str, seen_sha: dict[str, str]) -> list[Entry]:
    from sdk import Manifest

    out = []
    for item in filter(None, (s.strip() for s in arg.split(","))):
        name, root = _split_named(item)
        if not root.exists():
            raise BenchmarkError(f"--artifacts {item}: {root} does not exist")
        found = [root / "manifest.json"] if (root / "manifest.json").is_file() else sorted(root.rglob("manifest.json"))
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
            out.append(Entry(f"{group}/{m.target}-{m.precision}", group, "artifact", mf.parent, m.target, m.precision))
    return out


def parse_entries(artifacts: Sequence[str] = (), torch_models: Sequence[str] = ()) -> list[Entry]:
    """Entries from `--artifacts [NAME=]DIR[,…]` and `--torch NAME=MODEL_DIR` values (see the package docstring)."""
    seen_sha: dict[str, str] = {}  # target:sha256 -> first directory
    entries = [e for arg in artifacts for e in _artifact_entries(arg, seen_sha)]
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


def time_artifacts(dirs: dict[str, Path], images: np.ndarray, threads: int = 1, rounds: int = 3, warmup: int = 5,
                   repeats: int = 30) -> dict[str, dict[str, float]]:
    """Batch-1 latency of several artifacts through `sdk.Classifier`, timed in interleaved rounds (a drift
    of the machine's speed hits them alike): per name, the median over rounds of each round's median ms,
    and the worst round's p90. The runtimes run on `threads` threads and get the caller's counts back."""
    from sdk import Classifier

    per: dict[str, list[dict[str, float]]] = {k: [] for k in dirs}
    with pinned_threads(threads):
        runs = {k: Classifier.load(d, num_threads=threads).logprobs for k, d in dirs.items()}
        for _ in range(rounds):
            for k, run in runs.items():
                per[k].append(time_batch1(run, images, warmup, repeats))
    return {k: {"median_ms": float(np.median([r["median_ms"] for r in v])),
                "p90_ms": float(max(r["p90_ms"] for r in v)), "rounds": rounds, "repeats": repeats, "threads": threads}
            for k, v in per.items()}


def batched_pass(run: Callable[[np.ndarray], list[np.ndarray]], images: np.ndarray, batch: int,
                 ) -> tuple[list[np.ndarray], float]:
    """Log-probs of all images at `batch`, and images/s over every batch but the first (a warm-up)."""
    times = []

    def timed(x: np.ndarray) -> list[np.ndarray]:
        t0 = time.perf_counter()
        out = [np.asarray(o, np.float64) for o in run(x)]
        times.append((time.perf_counter() - t0, len(x)))
        return out

    lp = run_batched(timed, images, batch)
    timed_batches = times[1:] or times
    return lp, float(sum(k for _, k in timed_batches) / max(sum(t for t, _ in timed_batches), 1e-12))


def _executorch_pool():
    """ExecuTorch's pybindings when they expose its threadpool controls, else None."""
    try:
        from executorch.extension.pybindings import portable_lib as et
    except ImportError:
        return None
    return et if hasattr(et, "_unsafe_reset_threadpool") and hasattr(et, "_threadpool_get_thread_count") else None


@contextlib.contextmanager
def pinned_threads(threads: int, executorch: bool = True) -> Iterator[dict[str, Any]]:
    """Every runtime on `threads` threads for the duration of a block, then back to the count it had: a library
    call must not leave the caller's process (or the subprocesses it starts later) on another count. Yields the
    count each runtime got: env for OpenMP/MKL, torch, and ExecuTorch's XNNPACK threadpool (it sizes itself
    from the core count unless reset); onnxruntime and LiteRT take the count when a model is loaded
    (sdk.Classifier.load(num_threads=...))."""
    import torch

    env = {v: os.environ.get(v) for v in THREAD_VARS}
    before = torch.get_num_threads()
    et = _executorch_pool() if executorch else None
    et_before = int(et._threadpool_get_thread_count()) if et else None
    try:
        os.environ.update({v: str(threads) for v in THREAD_VARS})
        torch.set_num_threads(threads)
        rec: dict[str, Any] = {"torch": torch.get_num_threads(), "onnxruntime": threads, "tflite": threads}
        if et:
            et._unsafe_reset_threadpool(threads)
            rec["executorch"] = int(et._threadpool_get_thread_count())
        elif executorch:
            rec["executorch"] = "not set (no threadpool controls in this executorch)"
        yield rec
    finally:
        for var, val in env.items():
            if val is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = val
        torch.set_num_threads(before)
        if et_before:
            et._unsafe_reset_threadpool(et_before)


def _runner_torch(path: Path):
    from train.checkpoint import load_model, manifest_model_record
    from train.models import DeployWrapper

    model, cfg, tax, conf = load_model(path)
    deploy = DeployWrapper(model).eval()
    nbytes = (path / "model.safetensors").stat().st_size
    info = manifest_model_record(path, cfg, conf)  # the record an artifact of this checkpoint carries
    return lambda batch: torch_logprobs(deploy, batch, len(batch)), tax, cfg.image_size, nbytes, info, None


def _runner_artifact(path: Path, threads: int):
    from sdk import BackendUnavailableError, Classifier, Manifest

    m = Manifest.load(path)
    try:
        clf = Classifier.load(path, num_threads=threads)
    except BackendUnavailableError as e:
        return None, m.taxonomy, m.input.size, m.size_bytes, dict(m.model), str(e)
    return clf.logprobs, m.taxonomy, m.input.size, m.size_bytes, dict(m.model), None


def measure(entry: Entry, images_for: Callable[[int], np.ndarray], labels: np.ndarray, threads: int,
            warmup: int, repeats: int, batch: int, log=print) -> Row:
    """Load one entry and measure it on the split's images: size, latency, throughput, metrics."""
    from train.metrics import compute_metrics

    if entry.kind == "torch":
        run, tax, size, nbytes, info, unavailable = _runner_torch(entry.path)
    else:
        run, tax, size, nbytes, info, unavailable = _runner_artifact(entry.path, threads)
    rec = entry.record(size_mb=nbytes / 1e6, image_size=size, checkpoint_sha256=info.get("checkpoint_sha256"),
                       model_config=info.get("config"), taxonomy_hash=tax.hash)
    row = Row(entry, rec)
    if unavailable is not None:
        rec["status"] = "macOS only" if entry.target == "coreml" else "unavailable"
        rec["note"] = unavailable
        log(f"{entry.label}: {rec['status']} (size and spec only)")
        return row
    images = images_for(size)
    rec["latency"] = time_batch1(run, images, warmup, repeats)
    lp, ips = batched_pass(run, images, batch)
    rec.update(throughput_ips=ips, throughput_batch=batch, metrics=compute_metrics(tax, lp, labels), status="ok")
    row.logprobs = lp
    fine = tax.level_names[-1]
    log(f"{entry.label}: {rec['latency']['median_ms']:.2f} ms/img (p90 {rec['latency']['p90_ms']:.2f}), "
        f"{ips:.1f} img/s @ {batch}, fine top-1 {rec['metrics'][f'top1/{fine}']:.4f}")
    return row
