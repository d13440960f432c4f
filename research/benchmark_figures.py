"""What lies beyond the benchmark table: a compute roofline, calibration, back-off coverage, confusions, plots.

    python research/benchmark_figures.py --data $G --split val --artifacts student=demo/model \
        --artifacts flat-lite0=runs/flat-onnx --torch student=runs/student [--focus LABEL] [--threads 1] \
        [--limit 64] --out runs/benchmark-figures

The rows are measured exactly as `python -m converters benchmark` measures them (`measure_entries`), then:

- roofline: MACs per image of each model config (`count_macs`, on `train.models.DeployWrapper` at batch 1 with
  `torch.utils.flop_counter.FlopCounterMode`, MACs = FLOPs / 2) against this CPU's peak MAC rate read from
  its /proc/cpuinfo flags (`peak_macs`; the derivation is in docs/benchmark.md). Compute-only ceilings: a
  ratio well below 1 says memory, depthwise convolutions or per-operator overhead at batch 1 bound the model.
- for the focus rows (default: the fastest row of each model): reliability per level with ECE, back-off
  coverage curves, the most-confused pairs.
- accuracy_vs_latency.png with the Pareto front, confusion_/reliability_<row>.png, coverage_precision.png.

Writes <out>/benchmark_figures.{json,md} and the PNGs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters.benchmark import BenchmarkError, Row, measure_entries, parse_entries  # noqa: E402
from converters.benchmark.measure import slug  # noqa: E402
from converters.benchmark import read_cpuinfo  # noqa: E402
from research.output import write_results  # noqa: E402
from sdk import VNNI_FLAGS  # noqa: E402

MARKERS = {"onnx": "o", "tflite": "s", "executorch": "^", "pytorch": "D", "coreml": "x"}


# ---- roofline ----------------------------------------------------------------------------------------------
def peak_macs(cpu: dict[str, Any], fma_pipes: int = 2) -> dict[str, Any]:
    """Peak fp32 and int8 MACs/s of one core and of all cores, with the derivation as text."""
    flags = set(cpu["flags"])
    ghz = cpu["mhz"] / 1000.0
    if "avx512f" in flags and "AMD" not in cpu["vendor"]:
        bits, why = 512, "AVX-512 with 512-bit FMA pipes (Intel)"
    elif "avx2" in flags and "fma" in flags:
        bits = 256
        why = ("AVX2 + FMA" + (" (AVX-512 present but AMD executes it as two 256-bit halves)"
                               if "avx512f" in flags else ""))
    else:
        bits, why = 128, "SSE only (no AVX2 + FMA)"
    fp32_per_cycle = fma_pipes * bits // 32
    vnni = bool(flags & VNNI_FLAGS)
    int8_mult = 4.0 if vnni else 4.0 / 3.0
    int8_why = ("VNNI present (vpdpbusd: 4 int8 MACs per 32-bit lane per instruction) -> 4x fp32" if vnni else
                "no VNNI (vpmaddubsw + vpmaddwd + vpaddd: 32 MACs per 3 instructions vs 8 per FMA) -> 4/3 x fp32")
    one = {"fp32": ghz * 1e9 * fp32_per_cycle, "int8": ghz * 1e9 * fp32_per_cycle * int8_mult}
    return {
        "ghz": ghz, "fma_pipes": fma_pipes, "vector_bits": bits, "vnni": vnni,
        "fp32_macs_per_cycle": fp32_per_cycle, "int8_macs_per_cycle": fp32_per_cycle * int8_mult,
        "per_core_macs_per_s": one,
        "all_cores_macs_per_s": {k: v * cpu["cores"] for k, v in one.items()},
        "derivation": (f"{cpu['cores']} cores x {ghz:.3f} GHz (cpu MHz of /proc/cpuinfo) x {fma_pipes} FMA pipes x "
                       f"{bits}/32 fp32 lanes = {fp32_per_cycle} fp32 MACs/cycle/core [{why}]; int8: {int8_why}"),
    }


def count_macs(model_config: dict[str, Any], taxonomy) -> int:
    """MACs of one image through the exported graph (DeployWrapper at batch 1) = FLOPs / 2.

    Weights do not change the count, so the model is rebuilt from its config without loading them.
    torch.utils.flop_counter counts convolutions, matmuls and attention; elementwise ops are not counted.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from train.models import DeployWrapper, ModelConfig, build_model

    cfg = ModelConfig.from_dict(model_config)
    net = DeployWrapper(build_model(taxonomy, cfg, pretrained=False).eval()).eval()
    x = torch.zeros(1, cfg.image_size, cfg.image_size, 3, dtype=torch.uint8)
    # grad mode on (no no_grad / inference_mode): FlopCounterMode's module tracker hooks autograd
    with FlopCounterMode(display=False) as fc:
        net(x)
    return int(fc.get_total_flops() // 2)


def roofline(rows: list[Row], taxonomy, peak: dict[str, Any], threads: int) -> dict[str, Any]:
    """MACs per model config and, per measured row, achieved MACs/s over the peak of `threads` cores."""
    macs_by_cfg: dict[str, int] = {}
    out = {"peak": peak, "models": {}, "rows": {}}
    for r in rows:
        cfg = r.record.get("model_config")
        if not cfg:
            continue
        key = json.dumps(cfg, sort_keys=True)
        if key not in macs_by_cfg:
            macs_by_cfg[key] = count_macs(cfg, taxonomy)
        macs = macs_by_cfg[key]
        out["models"].setdefault(r.entry.group, {"macs": macs, "gmacs": macs / 1e9, "arch": cfg.get("arch"),
                                                 "backbone": cfg.get("backbone"), "image_size": cfg.get("image_size")})
        r.record["macs"] = macs
        if r.record.get("status") != "ok":
            continue
        ms = r.record["latency"]["median_ms"]
        achieved = macs / (ms / 1e3)
        kind = "int8" if r.entry.precision == "int8" else "fp32"
        ceiling = peak["per_core_macs_per_s"][kind] * threads
        floor_ms = macs / ceiling * 1e3
        out["rows"][r.entry.label] = {"achieved_gmacs_per_s": achieved / 1e9, "peak_gmacs_per_s": ceiling / 1e9,
                                      "peak_kind": kind, "ratio_of_peak": achieved / ceiling,
                                      "compute_bound_ms": floor_ms, "x_above_compute_bound": ms / floor_ms}
    return out


# ---- calibration, back-off, confusions ---------------------------------------------------------------------
def focus_rows(measured: list[Row], focus: Sequence[str]) -> list[Row]:
    """The rows `--focus` names, or what each model would ship as: its fastest measured row."""
    if focus:
        unknown = sorted(set(focus) - {r.entry.label for r in measured})
        if unknown:
            raise BenchmarkError(f"--focus {unknown} not among the measured rows: {[r.entry.label for r in measured]}")
        return [r for r in measured if r.entry.label in focus]
    return [min((r for r in measured if r.entry.group == g), key=lambda r: r.record["latency"]["median_ms"])
            for g in dict.fromkeys(r.entry.group for r in measured)]


def confused_pairs(paths: np.ndarray, labels: np.ndarray, taxonomy, top: int = 10) -> dict[str, list[dict[str, Any]]]:
    """Per level, the `top` most frequent (true -> predicted) confusions of the consistent path."""
    out = {}
    for l, name in enumerate(taxonomy.level_names):
        m = (labels[:, l] >= 0) & (paths[:, l] != labels[:, l])
        pairs: dict[tuple[int, int], int] = {}
        for t, p in zip(labels[m, l], paths[m, l]):
            pairs[(int(t), int(p))] = pairs.get((int(t), int(p)), 0) + 1
        best = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        out[name] = [{"true": taxonomy.node(l, t).name, "predicted": taxonomy.node(l, p).name, "count": c,
                      "share_of_true": c / max(int((labels[:, l] == t).sum()), 1)} for (t, p), c in best]
    return out


def reliability(probs: np.ndarray, correct: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Reliability bins (confidence vs accuracy) and the expected calibration error of one level."""
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    conf, acc, count = [], [], []
    for b in range(bins):
        m = idx == b
        count.append(int(m.sum()))
        conf.append(float(probs[m].mean()) if m.any() else float("nan"))
        acc.append(float(correct[m].mean()) if m.any() else float("nan"))
    n = max(len(probs), 1)
    ece = float(sum(c / n * abs(a - f) for c, a, f in zip(count, acc, conf) if c))
    return {"edges": edges.tolist(), "confidence": conf, "accuracy": acc, "count": count, "ece": ece}


def coverage_curves(probs: np.ndarray, correct: np.ndarray, n_thresholds: int = 101) -> dict[str, Any]:
    """Back-off sweeps of one global threshold t.

    `fine`: answer the fine node only when its marginal >= t (coverage = share answered, precision =
    share of those right). `backoff`: the same t at every level, the answer stops at the deepest level
    that clears it (coverage = answered nodes / all nodes, precision = answered nodes that are right).
    """
    from sdk import answered_depth

    depth = probs.shape[1]
    ts = np.linspace(0, 1, n_thresholds)
    fine_cov, fine_prec, bo_cov, bo_prec, full_cov = [], [], [], [], []
    for t in ts:
        a = probs[:, -1] >= t
        fine_cov.append(float(a.mean()))
        fine_prec.append(float(correct[a, -1].mean()) if a.any() else float("nan"))
        d = answered_depth(probs, [t] * depth)
        ans = np.arange(depth)[None, :] < d[:, None]
        bo_cov.append(float(ans.mean()))
        full_cov.append(float((d == depth).mean()))
        bo_prec.append(float(correct[ans].mean()) if ans.any() else float("nan"))
    return {"threshold": ts.tolist(), "fine": {"coverage": fine_cov, "precision": fine_prec},
            "backoff": {"coverage": bo_cov, "precision": bo_prec, "coverage_to_fine": full_cov}}


def coverage_at(curve: dict[str, Any], precision: float) -> float:
    """Largest coverage whose precision reaches `precision` (0.0 if none)."""
    c, p = np.asarray(curve["coverage"]), np.asarray(curve["precision"], dtype=float)
    ok = np.nan_to_num(p, nan=0.0) >= precision
    return float(c[ok].max()) if ok.any() else 0.0


def analyse(row: Row, taxonomy, labels: np.ndarray) -> dict[str, Any]:
    """Confusions, reliability per level and back-off curves of one measured row (from its log-probs)."""
    from sdk import decode_set

    ds = decode_set(taxonomy, row.logprobs, labels)
    full = (labels >= 0).all(1)
    paths, probs, lab = ds.paths[full], ds.probs[full], labels[full]
    correct = paths == lab
    rel = {name: reliability(probs[:, l], correct[:, l]) for l, name in enumerate(taxonomy.level_names)}
    cov = coverage_curves(probs, correct)
    at = {f"{mode}@{p}": coverage_at(cov[mode], p) for mode in ("fine", "backoff") for p in (0.9, 0.95, 0.98)}
    return {"confused": confused_pairs(ds.paths, labels, taxonomy), "reliability": rel, "coverage": cov,
            "coverage_at_precision": at}


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (lower latency x and higher accuracy y), sorted by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


# ---- plots -------------------------------------------------------------------------------------------------
def _save(plt, fig, path: Path, dpi: int) -> Path:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _accuracy_vs_latency(plt, measured: list[Row], fine: str, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(11, 5.5))
    fig.subplots_adjust(left=0.08, right=0.66, bottom=0.11, top=0.92)
    pts = [(r.record["latency"]["median_ms"], r.record["metrics"][f"top1/{fine}"]) for r in measured]
    groups = sorted({r.entry.group for r in measured})
    for k, (r, (x, y)) in enumerate(zip(measured, pts), 1):
        c = f"C{groups.index(r.entry.group) % 10}"
        ax.scatter([x], [y], marker=MARKERS.get(r.entry.target, "o"), s=60, color=c,
                   facecolors=c if r.entry.precision == "int8" else "none", linewidths=1.5)
        # numbers on the points, names in the key beside the axes: clustered rows stay readable
        ax.annotate(str(k), (x, y), fontsize=7, xytext=(4, 3 + 7 * (k % 3)), textcoords="offset points")
    front = pareto(pts)
    if front:
        fx, fy = zip(*[pts[i] for i in front])
        ax.step(fx, fy, where="post", color="k", lw=1, ls="--", label="Pareto frontier")
        ax.scatter(fx, fy, s=180, facecolors="none", edgecolors="k", lw=1)
    ax.set(xscale="log", xlabel="median ms / image, batch 1 (log)", ylabel=f"top-1 at '{fine}' (tree-consistent path)")
    ax.set_title("accuracy vs latency (filled = int8, hollow = fp32; marker = runtime)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    key = "\n".join(f"{k:>2}  {r.entry.label}: {x:.2f} ms, {y:.3f}" for k, (r, (x, y)) in enumerate(zip(measured, pts), 1))
    fig.text(0.68, 0.92, key, fontsize=7, va="top", family="monospace")
    return _save(plt, fig, out / "accuracy_vs_latency.png", 120)


def _confusions(plt, label: str, a: dict[str, Any], taxonomy, out: Path) -> Path:
    fig, axes = plt.subplots(1, taxonomy.depth, figsize=(5.5 * taxonomy.depth, 4.2))
    for ax, level in zip(np.atleast_1d(axes), taxonomy.level_names):
        pairs = a["confused"][level]
        ax.barh([f"{q['true']} → {q['predicted']}" for q in pairs][::-1], [q["count"] for q in pairs][::-1], color="C3")
        ax.set_title(f"'{level}': top {len(pairs)} confusions", fontsize=9)
        ax.set_xlabel("images")
        ax.tick_params(axis="y", labelsize=7)
        if not pairs:
            ax.text(0.5, 0.5, "no mistakes", ha="center", transform=ax.transAxes)
    fig.suptitle(f"{label}: most-confused pairs (true → predicted)", fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, out / f"confusion_{slug(label)}.png", 110)


def _reliability(plt, label: str, a: dict[str, Any], taxonomy, out: Path) -> Path:
    fig, axes = plt.subplots(1, taxonomy.depth, figsize=(4.2 * taxonomy.depth, 4.2))
    for ax, level in zip(np.atleast_1d(axes), taxonomy.level_names):
        rel = a["reliability"][level]
        e = np.asarray(rel["edges"])
        centers = (e[:-1] + e[1:]) / 2
        ax.bar(centers, np.nan_to_num(np.asarray(rel["accuracy"], float)), width=(e[1] - e[0]) * 0.95, color="C0",
               alpha=0.8, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        for x, n in zip(centers, rel["count"]):
            if n:
                ax.text(x, 0.02, str(n), ha="center", fontsize=6, color="k")
        ax.set_title(f"'{level}' (ECE {rel['ece']:.3f})", fontsize=9)
        ax.set(xlabel="marginal of the predicted node", xlim=(0, 1), ylim=(0, 1))
    np.atleast_1d(axes)[0].set_ylabel("accuracy")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{label}: reliability of the tree-consistent marginals", fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, out / f"reliability_{slug(label)}.png", 110)


def _coverage(plt, analyses: dict[str, dict[str, Any]], fine: str, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, (label, a) in enumerate(analyses.items()):
        for ax, mode in zip(axes, ("fine", "backoff")):
            ax.plot(a["coverage"][mode]["coverage"], a["coverage"][mode]["precision"], color=f"C{i % 10}", label=label)
    axes[0].set_title(f"one threshold on the '{fine}' marginal (answer or abstain)", fontsize=9)
    axes[0].set_xlabel("coverage (share of images answered)")
    axes[1].set_title("one threshold on every level's marginal (back-off)", fontsize=9)
    axes[1].set_xlabel("coverage (answered nodes / all nodes)")
    for ax in axes:
        ax.set(ylabel="precision", xlim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return _save(plt, fig, out / "coverage_precision.png", 120)


def plot_all(rows: list[Row], analyses: dict[str, dict[str, Any]], taxonomy, out: Path) -> list[Path]:
    """Every figure of a run, written into `out` as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fine = taxonomy.level_names[-1]
    written = [_accuracy_vs_latency(plt, [r for r in rows if r.record.get("status") == "ok"], fine, out)]
    for label, a in analyses.items():
        written += [_confusions(plt, label, a, taxonomy, out), _reliability(plt, label, a, taxonomy, out)]
    return written + [_coverage(plt, analyses, fine, out)]


# ---- the report --------------------------------------------------------------------------------------------
def _markdown(roof: dict[str, Any], analyses: dict[str, dict[str, Any]], names: Sequence[str], threads: int,
              plots: list[Path]) -> str:
    peak = roof["peak"]
    one, every = peak["per_core_macs_per_s"], peak["all_cores_macs_per_s"]
    lines = ["## Roofline", "", f"Peak: {peak['derivation']}.", "",
             f"Per core: fp32 {one['fp32'] / 1e9:.1f} GMAC/s, int8 {one['int8'] / 1e9:.1f} GMAC/s; all cores: fp32 "
             f"{every['fp32'] / 1e9:.1f}, int8 {every['int8'] / 1e9:.1f} GMAC/s. Rows run at {threads} thread(s), so "
             "each is compared with that many cores' peak.", "",
             "| model | MACs / image | arch | backbone | px |", "|---|---|---|---|---|"]
    lines += [f"| {g} | {v['macs'] / 1e6:.0f} M | {v['arch']} | {v['backbone']} | {v['image_size']} |"
              for g, v in roof["models"].items()]
    lines += ["", "| row | achieved GMAC/s | peak GMAC/s | ratio of peak | compute-bound ms | measured / bound |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['achieved_gmacs_per_s']:.1f} | {v['peak_gmacs_per_s']:.1f} ({v['peak_kind']}) | "
              f"{v['ratio_of_peak']:.3f} | {v['compute_bound_ms']:.2f} | {v['x_above_compute_bound']:.1f}× |"
              for k, v in roof["rows"].items()]
    lines += ["", "## Back-off and calibration (focus rows)", "",
              "| row | " + " | ".join(f"ECE {n}" for n in names) + " | coverage@95% fine-only | coverage@95% back-off |",
              "|---|" + "---|" * (len(names) + 2)]
    lines += [f"| {k} | " + " | ".join(f"{v['reliability'][n]['ece']:.3f}" for n in names)
              + f" | {v['coverage_at_precision']['fine@0.95']:.3f} | {v['coverage_at_precision']['backoff@0.95']:.3f} |"
              for k, v in analyses.items()]
    lines += ["", "Most-confused fine pairs:", ""]
    lines += [f"- {k}: " + ("; ".join(f"{q['true']} → {q['predicted']} ×{q['count']}"
                                     for q in v["confused"][names[-1]][:5]) or "none") for k, v in analyses.items()]
    return "\n".join(lines + ["", "## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--artifacts", action="append", default=[], metavar="[NAME=]DIR[,…]")
    p.add_argument("--torch", action="append", default=[], metavar="NAME=MODEL_DIR")
    p.add_argument("--reference", help="row label to measure agreement against")
    p.add_argument("--focus", action="append", default=[], metavar="LABEL",
                   help="rows to analyse and plot (default: the fastest row of each model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--limit", type=int, default=0, help="use N images spread over the split (0: all)")
    p.add_argument("--out", default="runs/benchmark-figures")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, taxonomy, labels, _ = measure_entries(parse_entries(a.artifacts, a.torch), a.data, a.split, a.threads,
                                                a.warmup, a.repeats, a.batch, a.limit, a.reference)
    measured = [r for r in rows if r.record["status"] == "ok"]
    analyses = {r.entry.label: analyse(r, taxonomy, labels) for r in focus_rows(measured, a.focus)}
    roof = roofline(rows, taxonomy, peak_macs(read_cpuinfo()), a.threads)
    plots = plot_all(rows, analyses, taxonomy, out)
    record = json.loads(json.dumps({"rows": [r.record for r in rows], "roofline": roof, "analysis": analyses,
                                    "plots": [p.name for p in plots]}, default=float))
    return write_results(out, "benchmark_figures", record,
                         _markdown(roof, analyses, taxonomy.level_names, a.threads, plots))


if __name__ == "__main__":
    sys.exit(main())
