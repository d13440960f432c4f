"""The benchmark driver and its command line (`python -m converters benchmark`)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .measure import BenchmarkError, Entry, Row, measure, parse_entries, pinned_threads
from .report import goal_lines, table_markdown, write_reports
from .machine import machine_info, machine_line
from .stats import agreement, goals


def common_taxonomy(entries: list[Entry]):
    """The one taxonomy every entry shares; BenchmarkError when they differ (accuracies not comparable)."""
    from sdk import Manifest, Taxonomy

    taxes = {e.label: Manifest.load(e.path).taxonomy if e.kind == "artifact" else Taxonomy.load(e.path / "taxonomy.json")
             for e in entries}
    if len({t.hash for t in taxes.values()}) != 1:
        raise BenchmarkError("entries use different taxonomies, their accuracies are not comparable: "
                             + ", ".join(f"{k}: {t.hash[:12]}" for k, t in taxes.items()))
    return next(iter(taxes.values()))


def measure_all(entries: list[Entry], ds, threads: int, warmup: int, repeats: int, batch: int, log) -> list[Row]:
    """Every entry measured on `ds`, decoded once per input size exactly as the SDK does on a device;
    a row that fails is reported as such and the others go on."""
    from sdk import prepare

    labels, cache = ds.labels(), {}

    def images_for(size: int) -> np.ndarray:
        if size not in cache:
            cache[size] = np.stack([prepare(s.source, size) for s in ds.samples])
        return cache[size]

    rows = []
    for e in entries:
        try:
            rows.append(measure(e, images_for, labels, threads, warmup, repeats, batch, log))
        except Exception as ex:  # one broken artifact must not lose the other rows; the failure is reported
            log(f"{e.label}: FAILED: {type(ex).__name__}: {ex}")
            rows.append(Row(e, e.record(size_mb=float("nan"), status="error", note=f"{type(ex).__name__}: {ex}")))
    return rows


def measure_entries(entries: list[Entry], data: str, split: str = "val", threads: int = 1, warmup: int = 10,
                    repeats: int = 50, batch: int = 8, limit: int = 0, reference: str | None = None,
                    log: Callable[[str], None] = print) -> tuple[list[Row], Any, np.ndarray, dict[str, Any]]:
    """Every entry measured on `data`/`split` (`limit` images spread over it, 0: all) with every runtime on
    `threads` threads, and its agreement with its reference: (rows, taxonomy, labels, machine record)."""
    from sdk import load_dataset

    with pinned_threads(threads, executorch=any(e.target == "executorch" for e in entries)) as thread_rec:
        machine = {**machine_info(threads), "runtime_threads": thread_rec}
        log(machine_line(machine))
        taxonomy = common_taxonomy(entries)
        ds = load_dataset(data, split, taxonomy=taxonomy)
        if limit:
            idx = np.linspace(0, len(ds) - 1, num=min(limit, len(ds))).round().astype(int)
            ds = ds.subset(sorted(set(idx.tolist())))
        rows = measure_all(entries, ds, threads, warmup, repeats, batch, log)
    agreement(rows, reference, taxonomy)
    return rows, taxonomy, ds.labels(), machine


def run_benchmark(entries: list[Entry], data: str, split: str = "val", out: str | Path = "runs/benchmark",
                  threads: int = 1, warmup: int = 10, repeats: int = 50, batch: int = 8, limit: int = 0,
                  reference: str | None = None, command: str = "", student: str | None = None,
                  peer: str | None = None, max_ms: float = 8.0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every entry on `data`/`split` and write benchmark.{md,json} and model cards to `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, taxonomy, labels, machine = measure_entries(entries, data, split, threads, warmup, repeats, batch, limit,
                                                      reference, log)
    settings = {"data": str(data), "split": split, "n_images": len(labels), "threads": threads, "warmup": warmup,
                "repeats": repeats, "batch": batch, "limit": limit, "reference": reference,
                "command": command or "python -m converters benchmark …",
                "goals": goals(rows, student, peer, max_ms, taxonomy)}
    paths = write_reports(out, rows, taxonomy, machine, settings)
    log("")
    log(machine_line(machine))
    log(table_markdown([r.record for r in rows], taxonomy.level_names))
    for line in goal_lines(settings["goals"])[2:-1]:  # the bars, one line each, as in benchmark.md
        log(line)
    log(f"wrote {paths['markdown']}, {paths['json']} and {sum(r.entry.kind == 'artifact' for r in rows)} model cards "
        f"in {out}")
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
                            batch=a.batch, limit=a.limit, reference=a.reference, command=command,
                            student=a.student, peer=a.peer, max_ms=a.max_ms)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if any(r["status"] == "error" for r in res["rows"]) else 0
