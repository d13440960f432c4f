"""`python -m converters benchmark` (docs/benchmark.md) — one table across export formats and peers, measured
in one run: size, batch-1 latency, throughput, `train.metrics.compute_metrics` and agreement with PyTorch fp32,
on the same decoded images; benchmark.md, benchmark.json, plots and a model card per artifact. Modules:
measure (rows, timing), stats, roofline, plots, report, run (the driver and its command line); profile and
profile_report (`python -m converters profile`: per-op time per runtime, int8 vs float).
"""

from .measure import (BenchmarkError, Entry, Row, batched_pass, parse_entries, pinned_threads, time_artifacts,
                      time_batch1)
from .profile import Profile, ProfileError, profile_model
from .profile_report import format_profile
from .roofline import count_macs, peak_macs
from .run import main, run_benchmark
from .stats import coverage_at, coverage_curves, goals, pareto, reliability, wilson

__all__ = ["BenchmarkError", "Entry", "Row", "parse_entries", "batched_pass", "time_batch1",
           "time_artifacts", "pinned_threads", "count_macs", "peak_macs",
           "main", "run_benchmark", "Profile", "ProfileError", "profile_model", "format_profile",
           "coverage_at", "coverage_curves", "goals", "pareto", "reliability", "wilson"]
