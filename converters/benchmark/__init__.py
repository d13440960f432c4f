"""`python -m converters benchmark` (docs/benchmark.md) — one table across export formats and peers, measured
in one run: size, batch-1 latency, throughput, `train.metrics.compute_metrics` and agreement with PyTorch fp32,
on the same decoded images; benchmark.md, benchmark.json and a model card per artifact. Modules: measure (rows,
timing), stats, roofline (the machine record), report, run (the driver and its command line); profile and
profile_report (`python -m converters profile`: per-op time per runtime, int8 vs float).
"""

from .measure import BenchmarkError, Entry, Row, parse_entries, pinned_threads, time_artifacts, time_batch1
from .profile import Profile, ProfileError, profile_model
from .profile_report import format_profile
from .run import main, measure_entries, run_benchmark
from .stats import goals, wilson

__all__ = ["BenchmarkError", "Entry", "Row", "parse_entries", "time_batch1", "time_artifacts", "pinned_threads",
           "main", "measure_entries", "run_benchmark", "Profile", "ProfileError", "profile_model", "format_profile",
           "goals", "wilson"]
