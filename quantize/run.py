"""The int8 pipeline: calibrate on real photos, measure what stays float, quantize each target, judge it."""

from __future__ import annotations

import importlib
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from converters import parity, run_batched
from sdk import Classifier, Manifest

from ._common import QuantContext, QuantizeError, TargetResult, prepare_context
from .bar import MAX_SIZE_RATIO, MAX_TOP1_DROP, MIN_AGREEMENT, meets_bar
from .recipes import resolve_recipes
from .sensitivity import disagreements, fine_kl
from .sim import model_logprobs, simulate

# `auto` builds ExecuTorch both ways and keeps the fastest artifact that meets the int8 bar; two whose
# batch-1 times differ by less than this share are a tie (one run's timing moves by a few per cent on a
# shared machine), which the one agreeing more with fp32 wins
SPEED_TIE = 0.05
LATENCY_PHOTOS = 32  # `val` photos each artifact is timed on, batch 1, one thread


def sdk_logprobs(directory: Path, images: np.ndarray, batch: int = 16) -> list[np.ndarray]:
    """Per-level log-probs of an artifact directory through `sdk.Classifier`, as a device runs it."""
    return run_batched(Classifier.load(directory).logprobs, images, batch)


def _split_record(taxonomy, source: str, labels, names, lp, lp32, lp_sim) -> dict[str, Any]:
    """int8 (`lp`) against fp32 (`lp32`) and the PyTorch simulation (`lp_sim`) on one set of photos."""
    from train.metrics import compute_metrics
    fine = taxonomy.level_names[-1]
    m8, m32 = compute_metrics(taxonomy, lp, labels), compute_metrics(taxonomy, lp32, labels)
    subset = lambda m: {k: v for k, v in m.items() if k.startswith("top1/") or k in ("full_path", "n")}  # noqa: E731
    return {"images": source, "fp32": subset(m32), "int8": subset(m8),
            "fine_top1_drop": m32[f"top1/{fine}"] - m8[f"top1/{fine}"], "agreement_with_fp32": parity(lp32, lp, taxonomy),
            "agreement_with_pytorch_simulation": parity(lp_sim, lp, taxonomy),
            "disagreements": disagreements(taxonomy, lp32, lp, names=names), "fine_kl_to_fp32": fine_kl(lp32, lp)}


def _judged(rec: dict[str, Any]) -> dict[str, Any]:
    """The figures a record's bar is judged on: the pooled splits, or its only split."""
    return rec.get("pooled") or next(iter(rec["splits"].values()))


def judge(res: TargetResult, evals, fp32_lp, sim_lp, taxonomy, sim_weights_only=None) -> dict[str, Any]:
    """int8 vs fp32 per split, and on the splits pooled (val + the train slice): the bar is judged on the
    pool, because one photo of `val` alone is 0.34 pt and the agreement bar sits below its noise."""
    fine = taxonomy.level_names[-1]
    rec: dict[str, Any] = {"target": res.target, "int8_dir": str(res.int8_dir), "scheme": res.scheme,
                           "float_layers": res.float_layers, "notes": res.notes,
                           "int8_size_bytes": res.int8_size, "fp32_size_bytes": res.fp32_size,
                           "size_ratio": (res.int8_size / res.fp32_size) if res.fp32_size else None,
                           "measured_on": "artifact through sdk.Classifier" if res.runnable_here else
                           "PyTorch simulation of the int8 weights (the runtime needs macOS)", "splits": {},
                           **res.extra}
    lps = {split: sdk_logprobs(res.int8_dir, s.images) if res.runnable_here else sim_weights_only[split]
           for split, s in evals.items()}
    rec["splits"] = {split: _split_record(taxonomy, s.source, s.labels, s.names, lps[split], fp32_lp[split],
                                          sim_lp[split]) for split, s in evals.items()}
    if len(evals) > 1:
        cat = lambda d: [np.concatenate([d[k][lvl] for k in evals]) for lvl in range(taxonomy.depth)]  # noqa: E731
        rec["pooled"] = _split_record(
            taxonomy, " + ".join(evals), np.concatenate([s.labels for s in evals.values()]),
            tuple(n for s in evals.values() for n in s.names), cat(lps), cat(fp32_lp), cat(sim_lp))
    judged = _judged(rec)
    rec["meets_bar"] = bool(meets_bar(judged["agreement_with_fp32"][f"agreement/{fine}"], judged["fine_top1_drop"])
                            and (rec["size_ratio"] is None or rec["size_ratio"] <= MAX_SIZE_RATIO))
    return rec


def pick_fastest(candidates: dict[str, dict[str, Any]]) -> str:
    """`auto`'s rule: of the schemes meeting the int8 bar (all of them, if none does), the fastest by
    `median_ms`; one within `SPEED_TIE` of it with a higher pooled `fine_agreement` wins the tie."""
    if not candidates:
        raise QuantizeError("no scheme was built: nothing to choose from")
    bad = [k for k, c in candidates.items() if not np.isfinite(c["median_ms"])]
    if bad:
        raise QuantizeError(f"latency not finite for {bad}")
    ok = {k: c for k, c in candidates.items() if c["meets_bar"]} or candidates
    fastest = min(c["median_ms"] for c in ok.values())
    near = [k for k, c in ok.items() if c["median_ms"] <= fastest * (1 + SPEED_TIE)]
    return max(near, key=lambda k: (ok[k]["fine_agreement"], -ok[k]["median_ms"]))


class Int8Run:
    """The targets of one run, built from one static `QuantContext` (`prepare_context`) and judged against fp32
    and against the PyTorch simulation of the scheme each was built from (ExecuTorch: static or dynamic
    activations); each scheme gets its context and simulation once."""

    def __init__(self, ctx: QuantContext, out: str | Path, recipes: dict[str, Any], log: Callable[[str], None] = print):
        self.ctx, self.out, self.recipes, self.log = ctx, Path(out), recipes, log
        self.fine = ctx.taxonomy.level_names[-1]
        log("fp32 references on the evaluation sets")
        self.fp32_lp = self._logprobs(ctx.model)
        self.contexts: dict[str, QuantContext] = {}  # the context each target was finally built from
        self.choice: dict[str, Any] | None = None  # how ExecuTorch's activations were chosen
        self._variants: dict[bool, tuple[QuantContext, dict[str, list[np.ndarray]]]] = {}
        self.coreml_lp = None
        if "coreml" in recipes:  # Core ML's runtime needs macOS: its int8 weights simulated (no scale clamp)
            layers = {f.name for f in ctx.families if f.prefixes}
            self.coreml_lp = self._logprobs(simulate(ctx.model, ctx.ranges, layers, weights_only=True,
                                                     shifts=ctx.coreml_shifts, weight_eps=0.0))

    def _logprobs(self, model) -> dict[str, list[np.ndarray]]:
        return {k: model_logprobs(model, s.images) for k, s in self.ctx.evals.items()}

    def variant(self, dynamic: bool) -> tuple[QuantContext, dict[str, list[np.ndarray]]]:
        """(context, simulated int8 log-probs on the evaluation sets) of an ExecuTorch activation scheme."""
        if dynamic not in self._variants:
            c = self.ctx.for_scheme(dynamic=True) if dynamic else self.ctx
            sim = simulate(c.model, c.ranges, set(c.plan.quantized), shifts=c.int8_shifts, dynamic=c.dynamic)
            self._variants[dynamic] = (c, self._logprobs(sim))
        return self._variants[dynamic]

    def judge(self, res: TargetResult, ctx: QuantContext) -> dict[str, Any]:
        """`judge` against the simulation of the scheme `ctx` was made for."""
        return judge(res, ctx.evals, self.fp32_lp, self.variant(ctx.dynamic is not None)[1], ctx.taxonomy,
                     self.coreml_lp)

    def build(self, target: str, dynamic: bool) -> tuple[TargetResult, dict[str, Any], QuantContext]:
        ctx = self.variant(dynamic)[0]
        res = importlib.import_module(f"quantize.{target}").quantize(ctx, self.out, self.recipes[target])
        return res, self.judge(res, ctx), ctx

    def latency(self, t: str, int8_dirs: dict[str, Path]) -> dict[str, dict[str, Any]]:
        """Batch-1, one-thread latency of each int8 artifact and of the target's fp32 export, timed interleaved."""
        from converters.benchmark import machine_info, time_artifacts

        if not int8_dirs:
            return {}
        images = next(iter(self.ctx.evals.values())).images[:LATENCY_PHOTOS]
        times = time_artifacts({**int8_dirs, "fp32": self.out / "fp32" / t}, images, threads=1)
        machine = machine_info(threads=1)
        f32 = times["fp32"]["median_ms"]
        return {k: {"int8_ms": times[k]["median_ms"], "int8_p90_ms": times[k]["p90_ms"], "fp32_ms": f32,
                    "int8_vs_fp32": times[k]["median_ms"] / f32, "threads": 1, "batch": 1, "photos": len(images),
                    "rounds": times[k]["rounds"], "cpu": f"{machine['cpu']} ({'+'.join(machine['simd']) or 'no AVX'})"}
                for k in int8_dirs}

    def build_target(self, t: str) -> dict[str, Any]:
        """Build, judge and time one target; its manifest gets the evaluation, the latency and, for ExecuTorch,
        how its activations were chosen. ExecuTorch `auto`: built with static and with dynamic activations, each
        judged and timed (one thread, batch 1, interleaved); the one `pick_fastest` keeps becomes `<out>/executorch`."""
        requested = getattr(self.recipes[t], "activations", "static")
        schemes = ("static", "dynamic") if requested == "auto" else (requested,)
        built: dict[str, tuple[TargetResult, dict[str, Any], QuantContext]] = {}
        cands: dict[str, dict[str, Any]] = {}
        for scheme in schemes:
            try:
                res, rec, ctx = self.build(t, scheme == "dynamic")
            except Exception as e:  # under `auto`, one scheme failing must not cost the target
                if len(schemes) == 1:
                    raise
                self.log(f"{t} ({scheme}): FAILED: {type(e).__name__}: {e}")
                cands[scheme] = {"error": f"{type(e).__name__}: {e}"}
                continue
            if len(schemes) > 1:  # parked while the other scheme is built
                park = self.out / f"{t}-{scheme}"
                shutil.rmtree(park, ignore_errors=True)
                res.int8_dir = res.int8_dir.rename(park)
            built[scheme] = (res, rec, ctx)
        if not built:
            raise QuantizeError(f"{t}: no activation scheme could be built: {cands}")
        lat = self.latency(t, {k: res.int8_dir for k, (res, _, _) in built.items() if res.runnable_here})
        chosen = requested
        if requested == "auto":
            for scheme, (_, rec, _) in built.items():
                judged = _judged(rec)
                cands[scheme] = {"median_ms": lat[scheme]["int8_ms"], "meets_bar": rec["meets_bar"],
                                 "fine_agreement": judged["agreement_with_fp32"][f"agreement/{self.fine}"],
                                 "fine_top1_drop": judged["fine_top1_drop"], "size_ratio": rec["size_ratio"]}
            chosen = pick_fastest({k: c for k, c in cands.items() if "error" not in c})
            shutil.rmtree(self.out / t, ignore_errors=True)
            for scheme, (res, rec, _) in built.items():
                if scheme != chosen:
                    shutil.rmtree(res.int8_dir)
                else:
                    res.int8_dir = res.int8_dir.rename(self.out / t)
                    rec["int8_dir"] = str(res.int8_dir)
            self.log(f"{t} activations (auto): " + ", ".join(
                f"{k} {c['median_ms']:.2f} ms, bar {'met' if c['meets_bar'] else 'not met'}" if "error" not in c
                else f"{k} failed" for k, c in cands.items()) + f" -> {chosen}")
        res, rec, self.contexts[t] = built[chosen]
        if chosen in lat:
            rec["latency"] = lat[chosen]
        m = Manifest.load(res.int8_dir)
        m.metrics["int8_evaluation"] = {k: v for k, v in rec.items() if k not in ("float_layers", "notes", "scheme")}
        if t == "executorch":  # its manifest says how its activations were chosen
            self.choice = {"requested": requested, "chosen": chosen}
            if requested == "auto":
                self.choice.update(candidates=cands, measured_on=rec["latency"]["cpu"],
                                   rule=f"the fastest that meets the int8 bar (batch 1, one thread, "
                                        f"{rec['latency']['photos']} val photos); within {SPEED_TIE:.0%} of it, "
                                        "the one agreeing more with fp32")
            m.metrics["quantization"]["activations_choice"] = self.choice
        m.save(res.int8_dir)
        return rec

    def _log_record(self, t: str, rec: dict[str, Any]) -> None:
        f = self.fine
        for split, r in rec["splits"].items():
            self.log(f"{t} {split}: fine top-1 fp32 {r['fp32'][f'top1/{f}']:.4f} int8 {r['int8'][f'top1/{f}']:.4f}, "
                     f"agreement {r['agreement_with_fp32'][f'agreement/{f}']:.4f} (vs sim "
                     f"{r['agreement_with_pytorch_simulation'][f'agreement/{f}']:.4f})")
        if rec["size_ratio"]:
            self.log(f"{t}: size {rec['int8_size_bytes'] / 1e6:.2f} MB = {rec['size_ratio'] * 100:.1f} % of fp32")

    def build_all(self) -> dict[str, dict[str, Any]]:
        """Every target's judged record; a target that fails gets an `error` record, the others go on."""
        results: dict[str, Any] = {}
        for t in self.recipes:
            self.log(f"== {t}")
            try:
                results[t] = self.build_target(t)
                self._log_record(t, results[t])
            except Exception as e:  # one target failing must not lose the others' results
                self.log(f"{t}: FAILED: {type(e).__name__}: {e}")
                results[t] = {"target": t, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                              "meets_bar": False}
        return results

    def report(self, results: dict[str, Any], seconds: float) -> dict[str, Any]:
        p = self.ctx
        return {"checkpoint": p.checkpoint, "data": p.data, "image_size": p.image_size,
                "calibration": p.calibration.source, "bias_correction": p.model_info.get("bias_correction"),
                "sensitivity": p.plan.to_dict(), "evaluation_sets": {k: s.source for k, s in p.evals.items()},
                "bar": {"max_fine_top1_drop": MAX_TOP1_DROP, "min_fine_agreement": MIN_AGREEMENT,
                        "max_size_ratio": MAX_SIZE_RATIO},
                "executorch_activations": self.choice, "targets": results, "seconds": seconds}


def quantize_checkpoint(checkpoint: str | Path, data: str, targets: Sequence[str], out: str | Path,
                        n_calibration: int = 300, n_sensitivity: int = 200, eval_limit: int = 0, n_parity: int = 64,
                        log: Callable[[str], None] = print, recipes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the whole int8 pipeline for a model directory; writes `<out>/<target>/` + report.{md,json}. int8
    is made from a copy corrected for weight rounding (`quantize.bias`). `recipes`: target -> its recipe."""
    from .report import write_report

    t0 = time.time()
    recipes = resolve_recipes(targets, recipes)
    ctx = prepare_context(checkpoint, data, targets, n_calibration, n_sensitivity, eval_limit, n_parity, log)
    Path(out).mkdir(parents=True, exist_ok=True)
    run = Int8Run(ctx, out, recipes, log)
    report = run.report(run.build_all(), round(time.time() - t0, 1))
    write_report(report, out)
    return report
