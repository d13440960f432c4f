"""Is an int8 target's loss in its quantized graph or in its runtime?

    python research/int8_runtime_gap.py --checkpoint runs/student --data $G \
        [--targets executorch,tflite] [--limit N] [--json out.json]

`python -m quantize` judges the artifact as a whole. This splits it in two. For each pt2e target it
builds the same quantized graph the target builds (same context, plan, bias correction, calibration;
`quantize.<target>.convert`) and runs it twice on `val` and the 20 % train slice:

- **graph**: the converted pt2e module in PyTorch — quantize/dequantize around float ops, i.e. the
  quantizer's grid and observers with PyTorch's float arithmetic;
- **runtime**: that same module lowered as the target lowers it (XNNPACK .pte / litert .tflite) and
  run by the target's runtime through the SDK's backend.

Against fp32 it prints fine agreement, changed answers and the mean KL of the fine distribution for
both, and the runtime against its own graph (what the runtime adds). With two targets it also compares
the two graphs with each other: if they agree and the runtimes do not, the difference is in execution.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = ("executorch", "tflite")


def graph_logprobs(gm, images: np.ndarray) -> list[np.ndarray]:
    """Per-level log-probs of a converted pt2e module (exported at batch 1) on uint8 NHWC photos."""
    import torch

    from converters import run_batched
    with torch.no_grad():
        lp = run_batched(lambda x: [o.numpy() for o in gm(torch.from_numpy(x))], images, 1)
    return [a.astype(np.float64) for a in lp]


def runtime_backend(target: str, ctx, converted, quantizer, workdir: Path):
    """Write `converted` as `quantize.<target>` writes it and open it with the SDK's backend."""
    import torch

    from quantize.executorch import write_pte
    from quantize.tflite import write_tflite
    from sdk._backends import ExecuTorchBackend, LiteRtBackend
    example = ctx.example()
    # the backends read only the input size and the outputs (the levels, then the embedding) from a manifest
    outputs = list(ctx.taxonomy.level_names)
    manifest = SimpleNamespace(input=SimpleNamespace(size=ctx.image_size), outputs=outputs,
                               graph_outputs=outputs + ["embedding"])
    if target == "executorch":
        write_pte(converted, example, workdir / "model.pte")
        return ExecuTorchBackend(workdir / "model.pte", manifest, 1)
    write_tflite(converted, quantizer, example, workdir / "model.tflite")
    return LiteRtBackend(workdir / "model.tflite", manifest, 1)


def compare(tax, ref, lp, names=()) -> dict:
    """Decoded fine answers of `lp` against `ref` (`quantize.sensitivity.disagreements`) and the fine KL;
    with `names` (one per image; only when `ref` is fp32, whose answers the records call "fp32"),
    `changed_photos` lists each changed photo as the int8 report does."""
    from quantize.sensitivity import disagreements, fine_kl
    d = disagreements(tax, ref, lp, names=names)
    return {"agreement": 1.0 - d["disagreeing"] / d["n"], "changed": d["disagreeing"], "n": d["n"],
            "fp32_gap_of_changed": d["fp32_gap_of_disagreeing"], "fine_kl": fine_kl(ref, lp),
            **({"changed_photos": d["changed"]} if names else {})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="the fp32 model directory")
    p.add_argument("--data", required=True, help="Grocery Store root")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--limit", type=int, default=0, help="judge at most N images per set (0 = all)")
    p.add_argument("--calibration-images", type=int, default=300)
    p.add_argument("--sensitivity-images", type=int, default=200)
    p.add_argument("--json", help="also write the records to this file")
    a = p.parse_args(argv)
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    if bad := [t for t in targets if t not in TARGETS]:
        p.error(f"unknown target(s) {bad}; choose from {','.join(TARGETS)}")
    if not Path(a.checkpoint).is_dir():
        p.error(f"{a.checkpoint}: not a directory")

    from quantize.executorch import convert, quantized_module_names, xnnpack_quantizer
    from quantize.run import prepare_context
    from quantize.sim import model_logprobs
    from quantize.tflite import litert_quantizer
    from train.metrics import compute_metrics

    ctx = prepare_context(a.checkpoint, a.data, targets, a.calibration_images, a.sensitivity_images, a.limit)
    tax = ctx.taxonomy
    fine = tax.level_names[-1]
    names = quantized_module_names(ctx)
    fp32 = {k: model_logprobs(ctx.model, s.images) for k, s in ctx.evals.items()}
    fp32_top1 = {k: compute_metrics(tax, fp32[k], s.labels)[f"top1/{fine}"] for k, s in ctx.evals.items()}
    graphs: dict[str, dict] = {}
    out: dict[str, dict] = {"images": {k: s.source for k, s in ctx.evals.items()}, "targets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for t in targets:
            quantizer = xnnpack_quantizer(names) if t == "executorch" else litert_quantizer(names)
            converted = convert(ctx, quantizer, fold_quantize=(t == "executorch"))
            # the levels only: the embedding output follows them
            graph = {k: graph_logprobs(converted, s.images)[:tax.depth] for k, s in ctx.evals.items()}
            graphs[t] = graph
            (Path(tmp) / t).mkdir()
            backend = runtime_backend(t, ctx, converted, quantizer, Path(tmp) / t)
            rec = out["targets"].setdefault(t, {})
            for split, s in ctx.evals.items():
                rt = [o.astype(np.float64) for o in backend.run(s.images)[:tax.depth]]  # in the fixed batch
                r = {"fp32_top1": fp32_top1[split],
                     "graph_top1": compute_metrics(tax, graph[split], s.labels)[f"top1/{fine}"],
                     "runtime_top1": compute_metrics(tax, rt, s.labels)[f"top1/{fine}"],
                     "graph_vs_fp32": compare(tax, fp32[split], graph[split], s.names),
                     "runtime_vs_fp32": compare(tax, fp32[split], rt, s.names),
                     "runtime_vs_graph": compare(tax, graph[split], rt)}
                rec[split] = r
                print(f"{t} {split}: fine top-1 fp32 {r['fp32_top1']:.4f} graph {r['graph_top1']:.4f} runtime "
                      f"{r['runtime_top1']:.4f} | " + "; ".join(
                          f"{k.replace('_', ' ')}: {v['agreement']:.4f} ({v['changed']} changed), KL {v['fine_kl']:.2e}"
                          for k, v in r.items() if isinstance(v, dict)), flush=True)
    if len(targets) == 2:
        x, y = targets
        out["graph_vs_graph"] = {}
        for split in ctx.evals:
            v = compare(tax, graphs[x][split], graphs[y][split])
            out["graph_vs_graph"][split] = v
            print(f"{x} graph vs {y} graph {split}: {v['agreement']:.4f} ({v['changed']} changed), KL {v['fine_kl']:.2e}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
