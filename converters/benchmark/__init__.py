"""`python -m converters benchmark` (docs/benchmark.md) — one table across export formats and peers, measured
in one run: size, batch-1 latency, throughput, `train.metrics.compute_metrics` and agreement with PyTorch fp32,
on the same decoded images; benchmark.md, benchmark.json and a model card per artifact. Modules: measure (rows,
timing), stats, machine (what it ran on), report, run (the driver and its command line).
"""

from .machine import machine_info, machine_line, read_cpuinfo
from .measure import BenchmarkError, Entry, Row, parse_entries, pinned_threads, time_artifacts, time_batch1
from .run import main, measure_entries, run_benchmark
from .stats import goals, wilson

__all__ = ["BenchmarkError", "Entry", "Row", "parse_entries", "time_batch1", "time_artifacts", "pinned_threads",
           "main", "measure_entries", "run_benchmark", "goals", "wilson", "machine_info", "machine_line", "read_cpuinfo"]
