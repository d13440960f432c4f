"""report.json (everything) and report.md (the tables a reviewer reads) for one quantization run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdk import atomic_write


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _activations_lines(c: dict[str, Any] | None) -> list[str]:
    if not c:
        return []
    if c["requested"] != "auto":
        return ["", f"ExecuTorch activations: {c['chosen']} (requested)."]
    built = "; ".join(f"{k}: failed ({v['error']})" if "error" in v else
                      f"{k}: {v['median_ms']:.2f} ms, pooled fine agreement {_pct(v['fine_agreement'])} %, "
                      f"size {_pct(v['size_ratio'])} %, bar {'met' if v['meets_bar'] else 'not met'}"
                      for k, v in c["candidates"].items())
    return ["", f"ExecuTorch activations: **{c['chosen']}** (auto; {c['rule']}). Built: {built}; "
                f"on {c['measured_on']}."]


CHANGED_LISTED = 20  # changed photos listed per split in report.md (all are in report.json)


def _plan_lines(r: dict[str, Any]) -> list[str]:
    s = r["sensitivity"]
    lines = ["## What stays float (measured)", "",
             f"Sensitivity on {s['images']}: each family quantized alone (PyTorch simulation).", "",
             "| family | fine agreement with fp32 | mean KL (fine) | in the plan |", "|---|---|---|---|"]
    lines += [f"| {f} | {_pct(a)} % | {s['sensitivity_fine_kl'].get(f, float('nan')):.2e} | "
              f"{'float' if f in s['float_families'] else 'int8'} |" for f, a in s["sensitivity_fine_agreement"].items()]
    lines += ["", "Greedy steps (all quantized families together):", ""]
    lines += [f"- float = {st['float'] or 'none'} → fine agreement {_pct(st['fine_agreement'])} %, "
              f"fine top-1 drop {100 * st['fine_top1_drop']:+.2f} pt, mean fine KL {st['fine_kl']:.2e}"
              + (" (bar not met: next family by agreement)" if "next_float_chosen_by" in st else "")
              for st in s["greedy_steps"]]
    return lines + _activations_lines(r.get("executorch_activations"))


def _split_rows(split: str, sr: dict[str, Any]) -> list[str]:
    levels = [k.split("/", 1)[1] for k in sr["fp32"] if k.startswith("top1/")]
    cells = [(lvl, f"top1/{lvl}", f"agreement/{lvl}") for lvl in levels] + [("full path", "full_path", "agreement/path")]
    return [f"| {split} | {name} | {_pct(sr['fp32'][m])} | {_pct(sr['int8'][m])} | {_pct(sr['agreement_with_fp32'][a])} | "
            f"{_pct(sr['agreement_with_pytorch_simulation'][a])} |" for name, m, a in cells]


def _changed_lines(split: str, sr: dict[str, Any]) -> list[str]:
    d = sr.get("disagreements")
    if not d:
        return []
    lines = [f"- {split}: {d['disagreeing']} of {d['n']} fine answers differ from fp32; fp32's gap between its two most "
             f"likely fine classes on them: {', '.join(f'{g:.3f}' for g in d['fp32_gap_of_disagreeing']) or '–'}; "
             f"agreement on the {d['sure_images']} images fp32 answers with a gap ≥ {d['near_tie']}: "
             f"{_pct(d['agreement_when_fp32_sure'])} %"
             + (f"; mean fine KL to fp32 {sr['fine_kl_to_fp32']:.2e}" if "fine_kl_to_fp32" in sr else "")]
    changed = d.get("changed", [])
    lines += [f"  - `{c['image']}`: fp32 {c['fp32']} → int8 {c['int8']} (fp32 gap {c['fp32_gap']:.3f})"
              for c in changed[:CHANGED_LISTED]]
    return lines + ([f"  - … {len(changed) - CHANGED_LISTED} more in report.json"] if len(changed) > CHANGED_LISTED else [])


def _target_lines(t: str, rec: dict[str, Any]) -> list[str]:
    if "error" in rec:
        return [f"### {t}", "", f"FAILED: `{rec['error']}`", ""]
    ratio = rec.get("size_ratio")
    lines = [f"### {t}", "", f"- scheme: {rec['scheme']}", f"- measured on: {rec['measured_on']}",
             f"- size: {rec['int8_size_bytes'] / 1e6:.2f} MB int8"
             + (f" vs {rec['fp32_size_bytes'] / 1e6:.2f} MB fp32 ({100 * ratio:.1f} %)" if ratio else ""),
             f"- stayed float: {'; '.join(rec['float_layers'])}", f"- meets the bar: **{'yes' if rec['meets_bar'] else 'no'}**"]
    if rec.get("latency"):
        lat = rec["latency"]
        lines.append(f"- latency (batch 1, one thread, {lat['cpu']}): {lat['int8_ms']:.2f} ms int8 vs "
                     f"{lat['fp32_ms']:.2f} ms fp32 ({lat['int8_vs_fp32']:.2f}x)")
    lines += [f"- note: {n}" for n in rec.get("notes", [])]
    lines += ["", "| split | level | fp32 top-1 | int8 top-1 | agreement with fp32 | agreement with PyTorch sim |",
              "|---|---|---|---|---|---|"]
    judged = {**rec["splits"], **({"pooled (the bar)": rec["pooled"]} if "pooled" in rec else {})}
    lines += [row for split, sr in judged.items() for row in _split_rows(split, sr)] + [""]
    notes = [line for split, sr in judged.items() for line in _changed_lines(split, sr)]
    return lines + (notes + [""] if notes else [])


def render_markdown(r: dict[str, Any]) -> str:
    bc = r["bias_correction"]
    skipped = f"; {len(bc['skipped'])} quantized layers had no bias to take it" if bc["skipped"] else ""
    lines = [f"# int8 report: {r['checkpoint']}", "",
             f"- data: `{r['data']}`, image size {r['image_size']}",
             f"- calibration: {r['calibration']}",
             "- evaluation: " + "; ".join(f"{k} = {v}" for k, v in r["evaluation_sets"].items()),
             f"- bar (ONNX, ExecuTorch, TFLite): fine top-1 drop ≤ {100 * r['bar']['max_fine_top1_drop']:.1f} pt, "
             f"fine agreement with fp32 ≥ {100 * r['bar']['min_fine_agreement']:g} % (on the evaluation sets pooled), "
             f"size ≤ {100 * r['bar']['max_size_ratio']:.0f} % of fp32",
             f"- bias correction: the mean output shift of int8 weight rounding, measured per channel on "
             f"{bc['images']}, folded into the biases of {bc['layers']} quantized layers (largest shift "
             f"{bc['max_shift']:.3g}){skipped}; int8 is made from that copy, judged against the unmodified fp32",
             "", *_plan_lines(r), "", "## Targets", ""]
    lines += [line for t, rec in r["targets"].items() for line in _target_lines(t, rec)]
    return "\n".join(lines + [f"Run time: {r['seconds']} s."]) + "\n"


def write_report(report: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    return (atomic_write(out / "report.json", json.dumps(report, indent=1, default=str)),
            atomic_write(out / "report.md", render_markdown(report)))
