"""The int8 pipeline: calibrate on real photos, measure what stays float, quantize each target, judge it."""

from __future__ import annotations

import importlib
import json
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from converters._common import parity
from sdk import Classifier, Manifest

from ._common import QuantContext, QuantizeError, TargetResult, split_summary
from .bar import MAX_SIZE_RATIO, MAX_TOP1_DROP, MIN_AGREEMENT, meets_bar
from .bias import bias_corrected, rounding_shifts
from .gptq import gptq_weights, with_weights
from .calibration import calibration_sets, evaluation_sets
from .sensitivity import choose_float_families, disagreements, fine_kl
from .sim import calibrate, check_families, dynamic_scheme, families, model_logprobs, simulate

TARGETS = ("onnx", "executorch", "tflite", "coreml")
ROUNDINGS = ("nearest", "gptq")
# ExecuTorch's activation schemes: calibrated int8 (the default) or quantized per photo at run time
ACTIVATIONS = ("auto", "static", "dynamic")
# `auto` takes ExecuTorch's dynamic scheme only when its simulated fine KL to fp32 on the sensitivity photos
# is at most this share of the static scheme's: it costs latency (float depthwise convs, per-photo input
# ranges) and size (float stem and depthwise weights), so a gain within noise is not worth it
DYNAMIC_KL_GAIN = 0.8


def _metrics_subset(m: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in m.items() if k.startswith("top1/") or k in ("full_path", "n")}


def sdk_logprobs(directory: Path, images: np.ndarray, batch: int = 16) -> list[np.ndarray]:
    clf = Classifier.load(directory)
    outs = [clf.logprobs(images[i:i + batch]) for i in range(0, len(images), batch)]
    return [np.concatenate([o[l] for o in outs]) for l in range(len(outs[0]))]


def judge(res: TargetResult, evals, fp32_lp, sim_lp, taxonomy, sim_weights_only=None) -> dict[str, Any]:
    """int8 vs fp32 per split: per-level and full-path accuracy, agreement with fp32 and with the simulation."""
    from train.metrics import compute_metrics
    fine = taxonomy.level_names[-1]
    rec: dict[str, Any] = {"target": res.target, "int8_dir": str(res.int8_dir), "scheme": res.scheme,
                           "float_layers": res.float_layers, "notes": res.notes,
                           "int8_size_bytes": res.int8_size, "fp32_size_bytes": res.fp32_size,
                           "size_ratio": (res.int8_size / res.fp32_size) if res.fp32_size else None,
                           "measured_on": "artifact through sdk.Classifier" if res.runnable_here else
                           "PyTorch simulation of the int8 weights (the runtime needs macOS)", "splits": {},
                           **res.extra}
    ok = True
    for split, s in evals.items():
        lp = sdk_logprobs(res.int8_dir, s.images) if res.runnable_here else sim_weights_only[split]
        m8 = compute_metrics(taxonomy, lp, s.labels)
        m32 = compute_metrics(taxonomy, fp32_lp[split], s.labels)
        vs32 = parity(fp32_lp[split], lp, taxonomy)
        vssim = parity(sim_lp[split], lp, taxonomy)
        drop = m32[f"top1/{fine}"] - m8[f"top1/{fine}"]
        rec["splits"][split] = {"images": s.source, "fp32": _metrics_subset(m32), "int8": _metrics_subset(m8),
                                "fine_top1_drop": drop, "agreement_with_fp32": vs32,
                                "agreement_with_pytorch_simulation": vssim,
                                "disagreements": disagreements(taxonomy, fp32_lp[split], lp, names=s.names),
                                "fine_kl_to_fp32": fine_kl(fp32_lp[split], lp)}
        ok &= meets_bar(vs32[f"agreement/{fine}"], drop)
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


def _trained_without_slice(checkpoint: Path, conf: dict[str, Any]) -> bool:
    """Did training hold out the same 20 % stratified train slice (seed 0) that int8 is judged on?"""
    tc = conf.get("train", {})
    return ((checkpoint / "holdout.txt").is_file() and abs(float(tc.get("holdout_fraction", 0)) - 0.2) < 1e-9
            and int(tc.get("seed", 0)) == 0 and tc.get("train_split", "train") == "train")


@dataclass
class Prepared:
    """What every target is made and judged from: the context, the evaluation sets and the measured plan."""

    ctx: QuantContext
    evals: dict[str, Any]  # split -> ImageSet (val and the 20 % train slice)
    conf: dict[str, Any]  # the checkpoint's config.json
    ranges: Any  # activation ranges of the fp32 model on the calibration photos
    int8_shifts: dict[str, Any] | None  # mean output shift of int8 weight rounding per channel (bias correction)
    rounded: dict[str, Any] | None  # GPTQ int8 weights per layer; None: round-to-nearest
    make_context: Callable[[Any], QuantContext] | None = None  # Plan -> its QuantContext (another float plan)
    sensitivity: Any = None  # ImageSet the float plan was measured on (training photos that did not calibrate)


def prepare_context(checkpoint: str | Path, data: str, targets: Sequence[str], n_calibration: int = 300,
                    n_sensitivity: int = 200, eval_limit: int = 0, n_parity: int = 64,
                    log: Callable[[str], None] = print, bias_correction: bool = True,
                    rounding: str = "nearest", plan_kl: float | None = None,
                    float_families: Sequence[str] = ()) -> Prepared:
    """Load the checkpoint, decode the real photos, calibrate, choose the float families by measurement,
    apply the weight rounding and bias correction: the `QuantContext` every target module quantizes from."""
    from train.checkpoint import file_sha256, load_model
    from .calibration import ImageSet

    if rounding not in ROUNDINGS:
        raise QuantizeError(f"unknown rounding {rounding!r}; roundings: {', '.join(ROUNDINGS)}")
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        raise QuantizeError(f"unknown target(s) {bad}; targets: {', '.join(TARGETS)}")
    model, cfg, tax, conf = load_model(checkpoint)
    try:  # before any photo is decoded
        check_families(model, float_families, "float families")
    except ValueError as e:
        raise QuantizeError(str(e)) from None
    size = cfg.image_size
    log(f"decoding real photos at {size} px (calibration {n_calibration}, sensitivity {n_sensitivity})")
    held_out = _trained_without_slice(Path(checkpoint), conf)
    cal, sen = calibration_sets(data, size, tax, n_calibration, n_sensitivity, sensitivity_from_slice=held_out)
    evals = evaluation_sets(data, size, tax, limit=eval_limit)
    log(f"calibrating activation ranges on {cal.source}")
    ranges = calibrate(model, cal.images)
    layer_fams = [f for f in families(model) if f.prefixes]
    rounded = None  # GPTQ int8 weights per layer; None: round-to-nearest
    t_round = time.time()
    if rounding == "gptq":
        log(f"GPTQ int8 weight rounding on {cal.source}")
        rounded = gptq_weights(model, cal.images, layer_fams, log=log)
    t_round = time.time() - t_round
    # `int8_shifts`: of the ExecuTorch / TFLite / ONNX int8 weights (GPTQ's, or round-to-nearest on the
    # observers' grid); `coreml_shifts`: of Core ML's rounding (round-to-nearest, no scale clamp), only
    # when Core ML is a target
    coreml_shifts = int8_shifts = None
    if bias_correction:
        log(f"measuring the mean output shift of int8 weight rounding per channel on {cal.source}")
        int8_shifts = rounding_shifts(model, cal.images, layer_fams, targets=rounded)
        if "coreml" in targets:
            coreml_shifts = rounding_shifts(model, cal.images, layer_fams, weight_eps=0.0)
    log(f"sensitivity pass on {sen.source}")
    plan = choose_float_families(model, ranges, sen.images, sen.labels, tax, source=sen.source, log=log,
                                 shifts=int8_shifts, weights=rounded, max_kl=plan_kl, keep_float=tuple(float_families))
    log(f"float families: {plan.float_families}")
    info = {"checkpoint_sha256": file_sha256(Path(checkpoint) / "model.safetensors"), "config": cfg.to_dict(),
            "metrics_pytorch": conf.get("metrics", {}),
            "weight_rounding": {"method": "round-to-nearest"} if rounded is None else
            {"method": "GPTQ (Frantar et al. 2023), fp32-input Hessians, 1 % dampening; Core ML: round-to-nearest",
             "layers": len(rounded), "n_images": len(cal), "images": cal.source, "seconds": round(t_round, 1)}}
    pidx = np.linspace(0, len(evals["val"]) - 1, num=min(n_parity, len(evals["val"]))).round().astype(int)
    par = ImageSet(evals["val"].images[pidx], evals["val"].labels[pidx], f"{evals['val'].source}, {len(pidx)} for parity")

    def make_context(plan, dynamic: bool = False) -> QuantContext:
        """The context for one float plan: its int8 source model (GPTQ weights and bias correction on the
        plan's quantized families) and the activation ranges the backends' observers see on it.
        `dynamic`: for ExecuTorch's dynamic scheme (`quantize.sim.DynamicScheme`), whose float layers
        (depthwise convs, the stem) are neither rounded nor corrected."""
        pinfo = dict(info)
        int8_model, int8_ranges = model, ranges
        quantized_fams = [f for f in families(model) if f.name in plan.quantized]
        scheme = dynamic_scheme(model, set(plan.quantized), cal.images) if dynamic else None
        skip = scheme.float if scheme is not None else frozenset()
        if rounded is not None:
            int8_model = with_weights(model, {k: v for k, v in rounded.items() if k not in skip}, quantized_fams)
        if int8_shifts is not None:
            int8_model, bc = bias_corrected(int8_model, {k: v for k, v in int8_shifts.items() if k not in skip},
                                            quantized_fams, len(cal), cal.source)
            pinfo["bias_correction"] = bc.to_dict()
            log(f"bias correction: {bc.layers} layers (largest shift {bc.max_shift:.3g})")
        if int8_model is not model:
            int8_ranges = calibrate(int8_model, cal.images)  # what the backends' observers see
        return QuantContext(model, tax, size, cal, par, plan, int8_ranges, pinfo, log, int8_model=int8_model,
                            coreml_shifts=coreml_shifts, fp32_exports=fp32_exports, dynamic=scheme)

    fp32_exports: dict = {}  # one fp32 export per target for every plan's context

    ctx = make_context(plan)
    return Prepared(ctx, evals, conf, ranges, int8_shifts, rounded, make_context, sen)


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


def quantize_checkpoint(checkpoint: str | Path, data: str, targets: Sequence[str], out: str | Path,
                        n_calibration: int = 300, n_sensitivity: int = 200, qat_epochs: int = 0,
                        eval_limit: int = 0, n_parity: int = 64, log: Callable[[str], None] = print,
                        qat: dict[str, Any] | None = None, bias_correction: bool = True,
                        rounding: str = "nearest", plan_kl: float | None = None,
                        executorch_activations: str = "auto", float_families: Sequence[str] = ()) -> dict[str, Any]:
    """Run the whole int8 pipeline for a model directory; writes `<out>/<target>/` + report.{md,json}.

    `qat_epochs` > 0: pt2e QAT for the targets whose PTQ misses the accuracy bar (`<out>/qat/<target>/`,
    report rows `<target>_qat`); `qat` overrides quantize.qat.QATConfig fields (images, lr, force, ...).
    `bias_correction`: the int8 artifacts come from a copy of the model whose biases undo the mean shift
    of int8 weight rounding, measured on the calibration photos (`quantize.bias`); fp32 stays the reference.
    `plan_kl`: the float plan must also keep the simulated mean fine KL to fp32 on the sensitivity photos at
    or below it (`quantize.sensitivity.choose_float_families`).
    `float_families`: families kept float from the start (by name, `quantize.sim.families`); the greedy adds to them.
    `executorch_activations`: "static" (calibrated int8 activations), "dynamic" (each Conv/Linear input
    quantized per photo at run time, `quantize.sim.DynamicScheme`) or "auto" (the one whose simulation is
    closer to fp32 on the sensitivity photos, `choose_activations`) for the ExecuTorch target.
    """
    if executorch_activations not in ACTIVATIONS:
        raise QuantizeError(f"unknown ExecuTorch activations {executorch_activations!r}; choose from "
                            f"{', '.join(ACTIVATIONS)}")
    from .report import write_report

    t0 = time.time()
    prep = prepare_context(checkpoint, data, targets, n_calibration, n_sensitivity, eval_limit, n_parity, log,
                           bias_correction, rounding, plan_kl, float_families)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx, evals, conf = prep.ctx, prep.evals, prep.conf
    model, tax, cal, plan, info = ctx.model, ctx.taxonomy, ctx.calibration, ctx.plan, ctx.model_info
    ranges, int8_shifts, rounded = prep.ranges, prep.int8_shifts, prep.rounded
    size, coreml_shifts = ctx.image_size, ctx.coreml_shifts
    layer_fams = [f for f in families(model) if f.prefixes]

    log("fp32 references on the evaluation sets")
    fp32_lp = {k: model_logprobs(model, s.images) for k, s in evals.items()}
    # (float plan, dynamic ExecuTorch activations) -> (its context, its simulated int8 model): the run's plan,
    # its dynamic scheme, and the earlier plans of the greedy a target over the size bar is rebuilt from; each
    # context (bias correction, observer ranges) and simulation is made once, its evaluation log-probs when a
    # target is judged against it
    variants: dict[tuple[tuple[str, ...], bool], tuple[QuantContext, Any]] = {}
    sim_lps: dict[tuple[tuple[str, ...], bool], dict[str, list[np.ndarray]]] = {}

    def variant(p, dyn: bool = False) -> tuple[QuantContext, Any]:
        key = (tuple(p.float_families), dyn)
        if key not in variants:
            c = ctx if p is plan and not dyn else prep.make_context(p, dynamic=dyn)
            variants[key] = (c, simulate(model, c.ranges, set(c.plan.quantized), shifts=int8_shifts,
                                         weights=rounded, dynamic=c.dynamic))
        return variants[key]

    def sim_logprobs(p, dyn: bool = False) -> dict[str, list[np.ndarray]]:
        key = (tuple(p.float_families), dyn)
        if key not in sim_lps:
            sim_lps[key] = {k: model_logprobs(variant(p, dyn)[1], s.images) for k, s in evals.items()}
        return sim_lps[key]

    simw_lp = None
    if "coreml" in targets:  # Core ML's int8 weights: round-to-nearest, no scale clamp
        simw = simulate(model, ranges, {f.name for f in layer_fams}, weights_only=True, shifts=coreml_shifts,
                        weight_eps=0.0)
        simw_lp = {k: model_logprobs(simw, s.images) for k, s in evals.items()}

    results: dict[str, Any] = {}
    contexts: dict[str, QuantContext] = {}  # the context each target was finally built from
    params = family_parameters(model)
    fine = tax.level_names[-1]
    choice = None  # how ExecuTorch's activations were chosen
    if "executorch" in targets:
        if executorch_activations == "auto":
            try:
                choice = choose_activations(model, variant(plan)[1], variant(plan, True)[1], prep.sensitivity, log)
            except Exception as e:  # the measurement failing must not cost the artifact: static is the default
                log(f"executorch activations (auto): measuring the dynamic scheme failed ({type(e).__name__}: {e}); static")
                choice = {"requested": "auto", "chosen": "static", "simulated_fine_kl": None,
                          "why": f"measuring the dynamic scheme failed: {type(e).__name__}: {e}"}
        else:
            choice = {"requested": executorch_activations, "chosen": executorch_activations}
    for t in targets:
        log(f"== {t}")
        try:
            mod = importlib.import_module(f"quantize.{t}")

            def build(p, dyn: bool) -> tuple[TargetResult, dict[str, Any], QuantContext]:
                c = variant(p, dyn)[0]
                if t == "executorch":  # its manifest says how its activations were chosen
                    c = replace(c, activations_choice=choice)
                res = mod.quantize(c, out)
                return res, judge(res, evals, fp32_lp, sim_logprobs(p, dyn), tax, simw_lp), c

            dyn = t == "executorch" and choice["chosen"] == "dynamic"
            res, rec, tctx = build(plan, dyn)
            if dyn and choice["requested"] == "auto" and (rec["size_ratio"] or 0) > MAX_SIZE_RATIO:
                # the dynamic scheme's float depthwise convs and stem cost size; the bar is a limit
                log(f"executorch: dynamic is {rec['size_ratio'] * 100:.1f} % of fp32, over the "
                    f"{MAX_SIZE_RATIO * 100:.0f} % size bar; rebuilding it static")
                choice = {**choice, "chosen": "static", "dynamic_size_ratio": rec["size_ratio"],
                          "why": "the dynamic artifact was over the size bar"}
                dyn = False
                res, rec, tctx = build(plan, dyn)
            tried = []
            for fb in fallback_order(plan, rec["int8_size_bytes"], rec["fp32_size_bytes"], params, MAX_SIZE_RATIO):
                if rec["size_ratio"] <= MAX_SIZE_RATIO:  # (no fp32 size: no fallbacks)
                    break
                # the size bar is a hard limit, the KL target a preference: this target is rebuilt from an
                # earlier plan of the greedy, with fewer of the families it floated for the KL target alone
                log(f"{t}: {rec['size_ratio'] * 100:.1f} % of fp32 with float {tctx.plan.float_families} is over the "
                    f"{MAX_SIZE_RATIO * 100:.0f} % size bar; rebuilding it with float {fb.float_families}")
                tried.append({"float_families": tctx.plan.float_families, "size_ratio": rec["size_ratio"],
                              "splits": split_summary(rec, fine)})
                res, rec, tctx = build(fb, dyn)
            if tried:
                rec["plan"] = {"float_families": tctx.plan.float_families,
                               "why": f"the --plan-kl {plan.max_kl:g} plan put the file over the size bar",
                               "over_the_size_bar": tried}
            contexts[t] = tctx
            m = Manifest.load(res.int8_dir)
            m.metrics["int8_evaluation"] = {k: v for k, v in rec.items() if k not in ("float_layers", "notes", "scheme")}
            m.save(res.int8_dir)
            results[t] = rec
            for split, r in rec["splits"].items():
                log(f"{t} {split}: fine top-1 fp32 {r['fp32'][f'top1/{fine}']:.4f} int8 {r['int8'][f'top1/{fine}']:.4f}, "
                    f"agreement {r['agreement_with_fp32'][f'agreement/{fine}']:.4f} (vs sim "
                    f"{r['agreement_with_pytorch_simulation'][f'agreement/{fine}']:.4f})")
            if rec["size_ratio"]:
                log(f"{t}: size {rec['int8_size_bytes'] / 1e6:.2f} MB = {rec['size_ratio'] * 100:.1f} % of fp32")
        except Exception as e:  # one target failing must not lose the others' results
            log(f"{t}: FAILED: {type(e).__name__}: {e}")
            results[t] = {"target": t, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                          "meets_bar": False}

    if qat_epochs > 0:
        from .qat import QATConfig, run_qat
        qcfg = QATConfig(**{"epochs": qat_epochs, "freeze_blocks": int(conf.get("train", {}).get("freeze_blocks", 0)),
                            **(qat or {})})

        def judge_qat(res: TargetResult) -> dict[str, Any]:  # against the simulation of the plan QAT started from
            c = contexts.get(res.target, ctx)
            return judge(res, evals, fp32_lp, sim_logprobs(c.plan, c.dynamic is not None), tax, simw_lp)

        results.update(run_qat(ctx, results, out, data, qcfg, judge_qat, MAX_TOP1_DROP, MIN_AGREEMENT, contexts))
    report = {"checkpoint": str(checkpoint), "data": str(data), "image_size": size, "calibration": cal.source,
              "weight_rounding": info["weight_rounding"],
              "bias_correction": info.get("bias_correction"), "sensitivity": plan.to_dict(), "evaluation_sets": {k: s.source for k, s in evals.items()},
              "bar": {"max_fine_top1_drop": MAX_TOP1_DROP, "min_fine_agreement": MIN_AGREEMENT,
                      "max_size_ratio": MAX_SIZE_RATIO},
              "executorch_activations": choice, "targets": results, "seconds": round(time.time() - t0, 1)}
    write_report(report, out)
    return report
