"""The int8 bar and the one rule that judges it, shared by the sensitivity pass and the per-target report.

It is judged on `val` and the 20 % train slice pooled: on `val` alone (296 photos) the agreement bar sat below
the noise floor of 8-bit weights. Figures move in steps of 1/N, so a figure exactly on the bar counts as within
it (in binary floats 0.97 - 0.965 > 0.005).
"""

from __future__ import annotations

MAX_TOP1_DROP = 0.005  # fine top-1 of int8 at most 0.5 pt below fp32
MIN_AGREEMENT = 0.985  # fine answer of int8 equal to fp32's on at least 98.5 % of photos (val + train slice)
MAX_SIZE_RATIO = 0.30  # int8 file at most 30 % of the fp32 file
_EPS = 1e-9


def drop_within(drop: float, max_top1_drop: float = MAX_TOP1_DROP) -> bool:
    return drop <= max_top1_drop + _EPS


def agreement_within(agreement: float, min_agreement: float = MIN_AGREEMENT) -> bool:
    return agreement >= min_agreement - _EPS


def meets_bar(agreement: float, drop: float, min_agreement: float = MIN_AGREEMENT,
              max_top1_drop: float = MAX_TOP1_DROP) -> bool:
    """Accuracy part of the bar: agreement and fine top-1 drop both within it."""
    return agreement_within(agreement, min_agreement) and drop_within(drop, max_top1_drop)
