"""The int8 pipeline: calibrate on real photos, measure what stays float, quantize each target, judge it."""

from __future__ import annotations

import importlib
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from converters import parity, run_batched
from sdk import Classifier, Manifest

from ._common import QuantContext, QuantizeError, TargetResult, split_summary
from .bar import MAX_SIZE_RATIO, MAX_TOP1_DROP, MIN_AGREEMENT, meets_bar
from .prepare import Prepared, prepare_context
from .recipes import resolve_recipes
from .sensitivity import Plan, disagreements, fine_kl
from .sim import families, model_logprobs, simulate

# `auto` takes ExecuTorch's dynamic scheme only when its simulated fine KL to fp32 on the sensitivity photos
# is at most this share of the static scheme's: it costs latency (float depthwise convs, per-photo input
# ranges) and size (float stem and depthwise weights), so a gain within noise is not worth it
DYNAMIC_KL_GAIN = 0.8


def sdk_logprobs(directory: Path, images: np.ndarray, batch: int = 16) -> list[np.ndarray]:
    """Per-level log-probs of an artifact directory through `sdk.Classifier`, as a device runs it."""
    return run_batched(Classifier.load(directory).logprobs, images, batch)


def _metrics_subset(m: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in m.items() if k.startswith("top1/") or k in ("full_path", "n")}


def _split_record(taxonomy, source: str, labels, names, lp, lp32, lp_sim) -> dict[str, Any]:
    """int8 (`lp`) against fp32 (`lp32`) and the PyTorch simulation (`lp_sim`) on one set of photos."""
    from train.metrics import compute_metrics
    fine = taxonomy.level_names[-1]
    m8, m32 = compute_metrics(taxonomy, lp, labels), compute_metrics(taxonomy, lp32, labels)
    return {"images": source, "fp32": _metrics_subset(m32), "int8": _metrics_subset(m8),
            "fine_top1_drop": m32[f"top1/{fine}"] - m8[f"top1/{fine}"], "agreement_with_fp32": parity(lp32, lp, taxonomy),
            "agreement_with_pytorch_simulation": parity(lp_sim, lp, taxonomy),
            "disagreements": disagreements(taxonomy, lp32, lp, names=names), "fine_kl_to_fp32": fine_kl(lp32, lp)}


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
    for split, s in evals.items():
        rec["splits"][split] = _split_record(taxonomy, s.source, s.labels, s.names, lps[split], fp32_lp[split],
                                             sim_lp[split])
    judged = next(iter(rec["splits"].values()))
    if len(evals) > 1:
        cat = lambda d: [np.concatenate([d[k][lvl] for k in evals]) for lvl in range(taxonomy.depth)]  # noqa: E731
        judged = rec["pooled"] = _split_record(
            taxonomy, " + ".join(evals), np.concatenate([s.labels for s in evals.values()]),
            tuple(n for s in evals.values() for n in s.names), cat(lps), cat(fp32_lp), cat(sim_lp))
    ok = meets_bar(judged["agreement_with_fp32"][f"agreement/{fine}"], judged["fine_top1_drop"])
    if rec["size_ratio"] is not None:
        ok &= rec["size_ratio"] <= MAX_SIZE_RATIO
    rec["meets_bar"] = bool(ok)
    return rec


def family_parameters(model) -> dict[str, int]:
    """Parameters under each family's module prefixes (its blocks' BatchNorms included)."""
    fams = families(model)
    out = {f.name: 0 for f in fams}
    for n, p in model.named_parameters():
        f = next((f for f in fams if f.prefixes and f.owns(n.rsplit(".", 1)[0])), None)
        if f is not None:
            out[f.name] += p.numel()
    return out


def fallback_order(plan, int8_size: int, fp32_size: int | None, params: dict[str, int], max_ratio: float) -> list:
    """The earlier plans to rebuild a target from when the --plan-kl plan's file is over the size bar:
    those whose file, estimated as this one minus 3 bytes per parameter that goes back to int8, fits
    the bar, most floats first; then the plan before the first KL float, which is tried in any case."""
    fbs = plan.kl_fallbacks()
    if not fbs or not fp32_size:
        return []
    fit = [fb for fb in fbs[:-1]
           if int8_size - 3 * sum(params.get(f, 0) for f in set(plan.float_families) - set(fb.float_families))
           <= max_ratio * fp32_size]
    return fit + [fbs[-1]]


def pick_activations(kl_static: float, kl_dynamic: float, gain: float | None = None) -> str:
    """`auto`'s rule: "dynamic" when its KL is at most `gain` (default `DYNAMIC_KL_GAIN`) times the static one's."""
    gain = DYNAMIC_KL_GAIN if gain is None else gain
    if not (np.isfinite(kl_static) and np.isfinite(kl_dynamic)):
        raise QuantizeError(f"simulated KL not finite (static {kl_static}, dynamic {kl_dynamic})")
    return "dynamic" if kl_dynamic <= gain * kl_static else "static"


def choose_activations(model, static_sim, dynamic_sim, sen, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure, on the sensitivity photos `sen` (the training photos the float plan was chosen on: neither
    calibration nor evaluation photos), the mean fine KL to fp32 of the PyTorch simulations of ExecuTorch's
    static and dynamic schemes for the run's plan, and pick one (`pick_activations`)."""
    fp32 = model_logprobs(model, sen.images)
    kl = {name: fine_kl(fp32, model_logprobs(sim, sen.images))
          for name, sim in (("static", static_sim), ("dynamic", dynamic_sim))}
    chosen = pick_activations(kl["static"], kl["dynamic"])
    log(f"executorch activations (auto): simulated fine KL to fp32 on {sen.source}: static {kl['static']:.3g}, "
        f"dynamic {kl['dynamic']:.3g} -> {chosen}")
    return {"requested": "auto", "chosen": chosen, "simulated_fine_kl": {k: float(v) for k, v in kl.items()},
            "photos": sen.source,
            "rule": f"dynamic when its simulated KL is at most {DYNAMIC_KL_GAIN:g} x the static one's (it is "
                    "slower and larger: float depthwise convs and stem, per-photo input ranges)"}


class Int8Run:
    """The targets of one run, built from one `Prepared` and judged against fp32 and against the PyTorch
    simulation of the plan each was built from. A target can be rebuilt from another plan (one of the
    greedy's earlier plans, for the size bar) or scheme (ExecuTorch static instead of dynamic): each
    (plan, scheme) gets its context and simulation once."""

    def __init__(self, prep: Prepared, out: str | Path, recipes: dict[str, Any], log: Callable[[str], None] = print):
        self.prep, self.out, self.recipes, self.log = prep, Path(out), recipes, log
        self.fine = prep.taxonomy.level_names[-1]
        log("fp32 references on the evaluation sets")
        self.fp32_lp = {k: model_logprobs(prep.model, s.images) for k, s in prep.evals.items()}
        self.params = family_parameters(prep.model)
        self.contexts: dict[str, QuantContext] = {}  # the context each target was finally built from
        self.choice: dict[str, Any] | None = None  # how ExecuTorch's activations were chosen
        self._variants: dict[tuple, tuple[QuantContext, Any]] = {}
        self._sim_lps: dict[tuple, dict[str, list[np.ndarray]]] = {}
        self.coreml_lp = self._weights_only_logprobs() if "coreml" in recipes else None

    def _weights_only_logprobs(self) -> dict[str, list[np.ndarray]]:
        """Core ML's int8 weights simulated (round-to-nearest, no scale clamp): its runtime needs macOS."""
        p = self.prep
        sim = simulate(p.model, p.ranges, {f.name for f in families(p.model) if f.prefixes}, weights_only=True,
                       shifts=p.coreml_shifts, weight_eps=0.0)
        return {k: model_logprobs(sim, s.images) for k, s in p.evals.items()}

    def variant(self, plan: Plan, dynamic: bool = False) -> tuple[QuantContext, Any]:
        """(context, simulated int8 model) of a float plan and ExecuTorch activation scheme."""
        key = (tuple(plan.float_families), dynamic)
        if key not in self._variants:
            p = self.prep
            c = p.ctx if plan is p.plan and not dynamic else p.context(plan, dynamic)
            self._variants[key] = (c, simulate(p.model, c.ranges, set(c.plan.quantized), shifts=p.int8_shifts,
                                               dynamic=c.dynamic))
        return self._variants[key]

    def sim_logprobs(self, plan: Plan, dynamic: bool = False) -> dict[str, list[np.ndarray]]:
        key = (tuple(plan.float_families), dynamic)
        if key not in self._sim_lps:
            sim = self.variant(plan, dynamic)[1]
            self._sim_lps[key] = {k: model_logprobs(sim, s.images) for k, s in self.prep.evals.items()}
        return self._sim_lps[key]

    def judge(self, res: TargetResult, ctx: QuantContext) -> dict[str, Any]:
        """`judge` against the simulation of the plan and scheme `ctx` was made for."""
        return judge(res, self.prep.evals, self.fp32_lp, self.sim_logprobs(ctx.plan, ctx.dynamic is not None),
                     self.prep.taxonomy, self.coreml_lp)

    def build(self, target: str, plan: Plan, dynamic: bool) -> tuple[TargetResult, dict[str, Any], QuantContext]:
        ctx = self.variant(plan, dynamic)[0]
        res = importlib.import_module(f"quantize.{target}").quantize(ctx, self.out, self.recipes[target])
        return res, self.judge(res, ctx), ctx

    def executorch_activations(self) -> dict[str, Any]:
        requested = self.recipes["executorch"].activations
        if requested != "auto":
            return {"requested": requested, "chosen": requested}
        plan = self.prep.plan
        try:
            return choose_activations(self.prep.model, self.variant(plan)[1], self.variant(plan, True)[1],
                                      self.prep.sensitivity, self.log)
        except Exception as e:  # the measurement failing must not cost the artifact: static is the default
            why = f"measuring the dynamic scheme failed: {type(e).__name__}: {e}"
            self.log(f"executorch activations (auto): {why}; static")
            return {"requested": "auto", "chosen": "static", "simulated_fine_kl": None, "why": why}

    def build_target(self, t: str) -> dict[str, Any]:
        """Build and judge one target; rebuilt static, then from earlier plans, while over the size bar."""
        dyn = t == "executorch" and self.choice["chosen"] == "dynamic"
        res, rec, ctx = self.build(t, self.prep.plan, dyn)
        if dyn and self.choice["requested"] == "auto" and (rec["size_ratio"] or 0) > MAX_SIZE_RATIO:
            # the dynamic scheme's float depthwise convs and stem cost size; the bar is a limit
            self.log(f"executorch: dynamic is {rec['size_ratio'] * 100:.1f} % of fp32, over the "
                     f"{MAX_SIZE_RATIO * 100:.0f} % size bar; rebuilding it static")
            self.choice = {**self.choice, "chosen": "static", "dynamic_size_ratio": rec["size_ratio"],
                           "why": "the dynamic artifact was over the size bar"}
            dyn = False
            res, rec, ctx = self.build(t, self.prep.plan, dyn)
        tried = []
        for fb in fallback_order(self.prep.plan, rec["int8_size_bytes"], rec["fp32_size_bytes"], self.params,
                                 MAX_SIZE_RATIO):
            if rec["size_ratio"] <= MAX_SIZE_RATIO:  # (no fp32 size: no fallbacks)
                break
            # the size bar is a hard limit, the KL target a preference: this target is rebuilt from an
            # earlier plan of the greedy, with fewer of the families it floated for the KL target alone
            self.log(f"{t}: {rec['size_ratio'] * 100:.1f} % of fp32 with float {ctx.plan.float_families} is over the "
                     f"{MAX_SIZE_RATIO * 100:.0f} % size bar; rebuilding it with float {fb.float_families}")
            tried.append({"float_families": ctx.plan.float_families, "size_ratio": rec["size_ratio"],
                          "splits": split_summary(rec, self.fine)})
            res, rec, ctx = self.build(t, fb, dyn)
        if tried:
            rec["plan"] = {"float_families": ctx.plan.float_families,
                           "why": f"the --plan-kl {self.prep.plan.max_kl:g} plan put the file over the size bar",
                           "over_the_size_bar": tried}
        self.contexts[t] = ctx
        m = Manifest.load(res.int8_dir)
        m.metrics["int8_evaluation"] = {k: v for k, v in rec.items() if k not in ("float_layers", "notes", "scheme")}
        if t == "executorch":  # its manifest says how its activations were chosen
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
        if "executorch" in self.recipes:
            self.choice = self.executorch_activations()
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
        p = self.prep
        return {"checkpoint": p.checkpoint, "data": p.data, "image_size": p.image_size,
                "calibration": p.calibration.source, "bias_correction": p.ctx.model_info.get("bias_correction"),
                "sensitivity": p.plan.to_dict(), "evaluation_sets": {k: s.source for k, s in p.evals.items()},
                "bar": {"max_fine_top1_drop": MAX_TOP1_DROP, "min_fine_agreement": MIN_AGREEMENT,
                        "max_size_ratio": MAX_SIZE_RATIO},
                "executorch_activations": self.choice, "targets": results, "seconds": seconds}


def quantize_checkpoint(checkpoint: str | Path, data: str, targets: Sequence[str], out: str | Path,
                        n_calibration: int = 300, n_sensitivity: int = 200, eval_limit: int = 0, n_parity: int = 64,
                        log: Callable[[str], None] = print, bias_correction: bool = True,
                        plan_kl: float | None = None, recipes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the whole int8 pipeline for a model directory; writes `<out>/<target>/` + report.{md,json}.

    `bias_correction`: int8 is made from a copy corrected for weight rounding (`quantize.bias`). `plan_kl`: the
    float plan must also bring the simulated fine KL to or below it. `recipes`: target -> its recipe.
    """
    from .report import write_report

    t0 = time.time()
    recipes = resolve_recipes(targets, recipes)
    prep = prepare_context(checkpoint, data, targets, n_calibration, n_sensitivity, eval_limit, n_parity, log,
                           bias_correction, plan_kl)
    Path(out).mkdir(parents=True, exist_ok=True)
    run = Int8Run(prep, out, recipes, log)
    report = run.report(run.build_all(), round(time.time() - t0, 1))
    write_report(report, out)
    return report
