"""Which families stay float: measured, one family at a time, on real photos that did not calibrate.

Each family alone is quantized in the PyTorch simulation (with bias correction) and scored by fine agreement
with fp32 and the mean fine KL (finer-grained than agreement on a few hundred photos). Then, while all
quantized families together miss the bar, the most sensitive family still quantized moves to float (by
agreement; ties: KL). LayerNorm and log-softmax inputs are measured but stay float: no backend here quantizes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from converters import parity
from sdk import Taxonomy, TreeDecoder

from .bar import MAX_TOP1_DROP, MIN_AGREEMENT, meets_bar
from .sim import ALWAYS_FLOAT, Ranges, families, model_logprobs, simulate


def fine_agreement(taxonomy: Taxonomy, ref: list[np.ndarray], cand: list[np.ndarray]) -> float:
    return parity(ref, cand, taxonomy)[f"agreement/{taxonomy.level_names[-1]}"]


NEAR_TIE = 0.1  # fp32 probability gap between its two most likely fine classes below which an answer is a near-tie


def disagreements(taxonomy: Taxonomy, ref: list[np.ndarray], cand: list[np.ndarray],
                  near_tie: float = NEAR_TIE, names: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """Where int8 changes the decoded fine answer, how sure was fp32 (the gap between its two most
    probable fine marginals)? Also the agreement on the images fp32 is sure of (gap >= `near_tie`; None when
    there are none: JSON has no NaN), and with `names` every changed photo, surest first: the photos to look at.
    """
    dec = TreeDecoder(taxonomy)
    a, b = dec.paths(ref)[:, -1], dec.paths(cand)[:, -1]
    top2 = np.sort(dec.marginals(ref)[-1], axis=1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    flip = a != b
    sure = gap >= near_tie
    out = {"n": int(len(a)), "disagreeing": int(flip.sum()),
           "fp32_gap_of_disagreeing": sorted(round(float(g), 4) for g in gap[flip]),
           "near_tie": near_tie, "sure_images": int(sure.sum()),
           "agreement_when_fp32_sure": float((~flip[sure]).mean()) if sure.any() else None}
    if len(names):
        if len(names) != len(a):
            raise ValueError(f"{len(names)} names for {len(a)} images")
        fine = taxonomy.names(taxonomy.depth - 1)
        out["changed"] = [{"image": str(names[i]), "fp32": fine[a[i]], "int8": fine[b[i]], "fp32_gap": round(float(gap[i]), 4)}
                          for i in sorted(np.flatnonzero(flip), key=lambda i: -gap[i])]
    return out


@dataclass
class Plan:
    """The measured quantization plan: families quantized / kept float and the evidence."""

    quantized: list[str]
    float_families: list[str]
    single: dict[str, float]  # family -> fine agreement with fp32 when only it is quantized
    single_kl: dict[str, float] = field(default_factory=dict)  # family -> mean KL(fp32 || sim), fine level
    steps: list[dict[str, Any]] = field(default_factory=list)  # combined configurations tried
    agreement: float = float("nan")  # combined plan's fine agreement with fp32 (simulation)
    n_images: int = 0
    images: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"quantized_families": self.quantized, "float_families": self.float_families,
                "sensitivity_fine_agreement": self.single, "sensitivity_fine_kl": self.single_kl, "greedy_steps": self.steps,
                "simulated_fine_agreement": self.agreement, "n_images": self.n_images, "images": self.images,
                "max_kl": None}  # the removed --plan-kl's KL target: kept so every manifest's plan reads alike


def fine_kl(ref: list[np.ndarray], cand: list[np.ndarray]) -> float:
    p = np.exp(ref[-1])
    return float((p * (ref[-1] - np.clip(cand[-1], -80, 0))).sum(1).mean())


def fine_top1(taxonomy: Taxonomy, lp: list[np.ndarray], labels: np.ndarray) -> float:
    return float((TreeDecoder(taxonomy).paths(lp)[:, -1] == labels[:, -1]).mean())


def choose_float_families(model, ranges: Ranges, images: np.ndarray, labels: np.ndarray, taxonomy: Taxonomy,
                          source: str = "", target_agreement: float = MIN_AGREEMENT, max_top1_drop: float = MAX_TOP1_DROP,
                          log: Callable[[str], None] = print, shifts: dict | None = None) -> Plan:
    """Measure each family's sensitivity and pick the float set (see module docstring); `shifts` as
    `quantize.sim.simulate` takes them."""
    ref = model_logprobs(model, images)
    acc_ref = fine_top1(taxonomy, ref, labels)
    fams = [f.name for f in families(model)]
    single: dict[str, float] = {}
    kl: dict[str, float] = {}
    for f in fams:
        lp = model_logprobs(simulate(model, ranges, {f}, shifts=shifts), images)
        single[f], kl[f] = fine_agreement(taxonomy, ref, lp), fine_kl(ref, lp)
        log(f"  sensitivity: {f:40s} fine agreement {single[f]:.4f}  KL {kl[f]:.2e}")
    floats = [f for f in fams if f in ALWAYS_FLOAT]
    steps = []
    while True:
        quant = [f for f in fams if f not in floats]
        if quant:
            lp = model_logprobs(simulate(model, ranges, set(quant), shifts=shifts), images)
            agr, drop = fine_agreement(taxonomy, ref, lp), acc_ref - fine_top1(taxonomy, lp, labels)
            kl_c = fine_kl(ref, lp)
        else:
            agr, drop, kl_c = 1.0, 0.0, 0.0
        steps.append({"float": list(floats), "fine_agreement": agr, "fine_top1_drop": drop, "fine_kl": kl_c})
        log(f"  combined: float={floats} -> fine agreement {agr:.4f}, fine top-1 drop {drop * 100:+.2f} pt, KL {kl_c:.2e}")
        if meets_bar(agr, drop, target_agreement, max_top1_drop) or not quant:
            break
        floats.append(min(quant, key=lambda f: (single[f], -kl[f])))  # the family changing most answers alone
        steps[-1]["next_float_chosen_by"] = "agreement"
    return Plan(quant, floats, single, kl, steps, agr, len(images), source)
