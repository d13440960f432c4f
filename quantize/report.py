"""report.json (everything) and report.md (the tables a reviewer reads) for one quantization run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def qat_section(r: dict[str, Any]) -> list[str]:
    """QAT vs post-training int8, fine level, per target and split (empty when no QAT ran)."""
    rows = {t: rec for t, rec in r["targets"].items() if t.endswith("_qat") and "qat" in rec}
    failed = {t: rec for t, rec in r["targets"].items() if t.endswith("_qat") and "error" in rec}
    if not rows and not failed:
        return []
    lines = ["## QAT vs post-training int8", "",
             "| target | split | fp32 fine top-1 | PTQ fine top-1 | QAT fine top-1 | PTQ agreement | QAT agreement | QAT meets the bar |",
             "|---|---|---|---|---|---|---|---|"]
    for t, rec in rows.items():
        fine = rec["fine_level"]
        for split, s in rec["splits"].items():
            p = rec["ptq"].get(split, {})
            lines.append(f"| {t.removesuffix('_qat')} | {split} | {_pct(p.get('fp32_fine_top1'))} | "
                         f"{_pct(p.get('int8_fine_top1'))} | {_pct(s['int8'][f'top1/{fine}'])} | "
                         f"{_pct(p.get('fine_agreement'))} | {_pct(s['agreement_with_fp32'][f'agreement/{fine}'])} | "
                         f"{'yes' if rec['meets_bar'] else 'no'} |")
    lines.append("")
    for t, rec in rows.items():
        q = rec["qat"]
        hist = "; ".join(f"epoch {h['epoch']}: loss {h['loss']:.4f} (KL to fp32 {h['kl_to_fp32']:.4f})" for h in q["history"])
        lines.append(f"- {t}: {q['epochs']} epoch(s) on {q['images_source']}, lr {q['lr']}, batch {q['batch_size']}, "
                     f"{q['trainable_params']} trainable parameters, activation ranges: {q.get('activation_ranges', 'moving averages')}; triggered by: {'; '.join(rec['trigger'])}; {hist}")
    for t, rec in failed.items():
        lines.append(f"- {t}: QAT FAILED: `{rec['error']}`")
    return lines + [""]


def _bias_line(bc: dict[str, Any] | None) -> str:
    if not bc:
        return "- bias correction: off (int8 made from the model as trained)"
    skipped = f"; {len(bc['skipped'])} quantized layers had no bias to take it" if bc["skipped"] else ""
    return (f"- bias correction: the mean output shift of int8 weight rounding, measured per channel on "
            f"{bc['images']}, folded into the biases of {bc['layers']} quantized layers (largest shift "
            f"{bc['max_shift']:.3g}){skipped}; int8 is made from that copy, judged against the unmodified fp32")


def _rounding_line(wr: dict[str, Any] | None) -> str:
    if not wr or wr.get("method") == "round-to-nearest":
        return "- int8 weight rounding: round-to-nearest"
    return (f"- int8 weight rounding: {wr['method']}; {wr['layers']} layers on {wr['images']} "
            f"({wr['seconds']} s)")


def _activations_lines(c: dict[str, Any] | None) -> list[str]:
    if not c:
        return []
    if c["requested"] != "auto":
        return ["", f"ExecuTorch activations: {c['chosen']} (requested)."]
    kl = c["simulated_fine_kl"]
    if kl is None:
        return ["", f"ExecuTorch activations: {c['chosen']} (auto; {c['why']})."]
    return ["", f"ExecuTorch activations: **{c['chosen']}** (auto). Simulated mean fine KL to fp32 on {c['photos']}: "
                f"static {kl['static']:.2e}, dynamic {kl['dynamic']:.2e}; rule: {c['rule']}." +
                (f" Built static: the dynamic file was {100 * c['dynamic_size_ratio']:.1f} % of fp32, over the size bar."
                 if "dynamic_size_ratio" in c else "")]


CHANGED_LISTED = 20  # changed photos listed per split in report.md (all are in report.json)


def render_markdown(r: dict[str, Any]) -> str:
    lines = [f"# int8 report: {r['checkpoint']}", "",
             f"- data: `{r['data']}`, image size {r['image_size']}",
             f"- calibration: {r['calibration']}",
             f"- evaluation: " + "; ".join(f"{k} = {v}" for k, v in r["evaluation_sets"].items()),
             f"- bar (ONNX, ExecuTorch, TFLite): fine top-1 drop ≤ {100 * r['bar']['max_fine_top1_drop']:.1f} pt, "
             f"fine agreement with fp32 ≥ {100 * r['bar']['min_fine_agreement']:.0f} %, "
             f"size ≤ {100 * r['bar']['max_size_ratio']:.0f} % of fp32",
             _rounding_line(r.get("weight_rounding")), _bias_line(r.get("bias_correction")), "",
             "## What stays float (measured)", "",
             f"Sensitivity on {r['sensitivity']['images']}: each family quantized alone (PyTorch simulation).", "",
             "| family | fine agreement with fp32 | mean KL (fine) | in the plan |", "|---|---|---|---|"]
    s = r["sensitivity"]
    for f, a in s["sensitivity_fine_agreement"].items():
        lines.append(f"| {f} | {_pct(a)} % | {s['sensitivity_fine_kl'].get(f, float('nan')):.2e} | "
                     f"{'float' if f in s['float_families'] else 'int8'} |")
    target = "" if s.get("max_kl") is None else f"; target: mean fine KL ≤ {s['max_kl']:.1e} as well as the bar"
    if s.get("requested_float"):
        lines += ["", f"Kept float on request (`--float-families`) before the greedy: {', '.join(s['requested_float'])}"]
    lines += ["", f"Greedy steps (all quantized families together{target}):", ""]
    for st in s["greedy_steps"]:
        lines.append(f"- float = {st['float'] or 'none'} → fine agreement {_pct(st['fine_agreement'])} %, "
                     f"fine top-1 drop {100 * st['fine_top1_drop']:+.2f} pt" +
                     (f", mean fine KL {st['fine_kl']:.2e}" if "fine_kl" in st else "") +
                     {"kl": " (bar met, KL target not: next family by KL)",
                      "agreement": " (bar not met: next family by agreement)"}.get(st.get("next_float_chosen_by"), ""))
    lines += _activations_lines(r.get("executorch_activations"))
    lines += ["", "## Targets", ""]
    for t, rec in r["targets"].items():
        lines += [f"### {t}", ""]
        if "error" in rec:
            lines += [f"FAILED: `{rec['error']}`", ""]
            continue
        if rec.get("skipped"):
            lines += [f"- QAT not available: {rec['reason']}", f"- triggered by: {'; '.join(rec['trigger'])}"]
            if "float_families_tried" in rec:
                lines.append("- float families tried instead (greedy, measured): " +
                             "; ".join(", ".join(f) or "none" for f in rec["float_families_tried"]))
            lines.append("")
            continue
        ratio = rec.get("size_ratio")
        lines += [f"- scheme: {rec['scheme']}", f"- measured on: {rec['measured_on']}",
                  f"- size: {rec['int8_size_bytes'] / 1e6:.2f} MB int8" +
                  (f" vs {rec['fp32_size_bytes'] / 1e6:.2f} MB fp32 ({100 * ratio:.1f} %)" if ratio else ""),
                  f"- stayed float: {'; '.join(rec['float_layers'])}",
                  f"- meets the bar: **{'yes' if rec['meets_bar'] else 'no'}**"]
        lines += [f"- note: {n}" for n in rec.get("notes", [])]
        if rec.get("plan"):  # rebuilt with fewer of the --plan-kl floats for the size bar
            lines.append(f"- float plan: {', '.join(rec['plan']['float_families'])}, because {rec['plan']['why']}; tried:")
            lines += [f"  - float {', '.join(w['float_families'])}: {100 * w['size_ratio']:.1f} %; " +
                      "; ".join(f"{k} agreement {_pct(v['fine_agreement'])} %, drop {100 * v['fine_top1_drop']:+.1f} pt, "
                                f"KL {v['fine_kl_to_fp32']:.2e}" for k, v in w["splits"].items())
                      for w in rec["plan"]["over_the_size_bar"]]
        lines += ["", "| split | level | fp32 top-1 | int8 top-1 | agreement with fp32 | agreement with PyTorch sim |",
                  "|---|---|---|---|---|---|"]
        for split, sr in rec["splits"].items():
            levels = [k.split("/", 1)[1] for k in sr["fp32"] if k.startswith("top1/")]
            for lvl in levels:
                lines.append(f"| {split} | {lvl} | {_pct(sr['fp32'][f'top1/{lvl}'])} | {_pct(sr['int8'][f'top1/{lvl}'])} | "
                             f"{_pct(sr['agreement_with_fp32'][f'agreement/{lvl}'])} | "
                             f"{_pct(sr['agreement_with_pytorch_simulation'][f'agreement/{lvl}'])} |")
            lines.append(f"| {split} | full path | {_pct(sr['fp32']['full_path'])} | {_pct(sr['int8']['full_path'])} | "
                         f"{_pct(sr['agreement_with_fp32']['agreement/path'])} | "
                         f"{_pct(sr['agreement_with_pytorch_simulation']['agreement/path'])} |")
        lines.append("")
        notes = []
        for split, sr in rec["splits"].items():
            d = sr.get("disagreements")
            if d:
                notes.append(f"- {split}: {d['disagreeing']} of {d['n']} fine answers differ from fp32; fp32's gap "
                             f"between its two most likely fine classes on them: "
                             f"{', '.join(f'{g:.3f}' for g in d['fp32_gap_of_disagreeing']) or '–'}; agreement on "
                             f"the {d['sure_images']} images fp32 answers with a gap ≥ {d['near_tie']}: "
                             f"{_pct(d['agreement_when_fp32_sure'])} %" +
                             (f"; mean fine KL to fp32 {sr['fine_kl_to_fp32']:.2e}" if "fine_kl_to_fp32" in sr else ""))
                shown = d.get("changed", [])[:CHANGED_LISTED]
                notes += [f"  - `{c['image']}`: fp32 {c['fp32']} → int8 {c['int8']} (fp32 gap {c['fp32_gap']:.3f})" for c in shown]
                if len(d.get("changed", [])) > len(shown):
                    notes.append(f"  - … {len(d['changed']) - len(shown)} more in report.json")
        if notes:
            lines += notes + [""]
    lines += qat_section(r)
    lines.append(f"Run time: {r['seconds']} s.")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    j = out / "report.json"
    j.write_text(json.dumps(report, indent=1, default=str))
    md = out / "report.md"
    md.write_text(render_markdown(report))
    return j, md
