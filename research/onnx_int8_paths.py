"""One int8 ONNX artifact run three ways by onnxruntime, on real photos: which answers and how fast.

    python research/onnx_int8_paths.py --model demo/model --data $G [--split val] [--limit N] [--json out.json]

- `fused`: graph optimizations on (QDQ fused into int8 kernels: what deploys on VNNI x86 and ARM);
- `unfused`: `session.disable_quant_qdq` (quantize/dequantize nodes kept, float operators between them,
  other fusions on: what the SDK runs on x86 without VNNI, where the fused kernels saturate);
- `exact`: every optimization off (each node as written: the int8 model's own arithmetic).

Prints fine top-1 per path, fine agreement of each with `exact`, and the batch-1, one-thread median
latency (interleaved rounds), with this CPU's VNNI flag.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PATHS = ("fused", "unfused", "exact")


def session(model: Path, path: str):
    import onnxruntime as ort
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = 1, 1, 3
    if path == "unfused":
        o.add_session_config_entry("session.disable_quant_qdq", "1")
    if path == "exact":
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(model), o, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python research/onnx_int8_paths.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="an int8 ONNX artifact directory")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds over the photos")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from research.output import print_table
    from sdk import Classifier
    from sdk._backends import cpu_has_vnni
    from sdk.datasets import load_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = Classifier.load(a.model, num_threads=1)
    ds = load_dataset(a.data, a.split, clf.taxonomy)
    samples = ds.samples[:a.limit] if a.limit else ds.samples
    x = np.stack([clf.preprocess(s.source) for s in samples])
    truth = np.array([s.labels[-1] for s in samples])
    fine = clf.taxonomy.depth - 1
    sessions = {k: session(clf.manifest.artifact_path(a.model), k) for k in PATHS}
    answers: dict[str, np.ndarray] = {}
    times: dict[str, list[float]] = {k: [] for k in PATHS}
    for r in range(a.rounds):
        for k, s in sessions.items():
            inp, outs, got = s.get_inputs()[0].name, [o.name for o in s.get_outputs()], []
            for i in range(len(x)):
                t = time.perf_counter()
                o = s.run(outs, {inp: x[i:i + 1]})
                times[k].append(time.perf_counter() - t)
                got.append(int(o[fine].argmax(-1)[0]))
            answers[k] = np.array(got)
    res = {"model": a.model, "split": a.split, "photos": len(x), "vnni": cpu_has_vnni(), "paths": {
        k: {"fine_top1": float((answers[k] == truth).mean()),
            "agreement_with_exact": float((answers[k] == answers["exact"]).mean()),
            "median_ms": 1000 * float(np.median(times[k]))} for k in PATHS}}
    lines = [f"{a.model} on {len(x)} {a.split} photos, VNNI {res['vnni']}", "",
             "| path | fine top-1 | agreement with exact | ms |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['fine_top1']:.3f} | {v['agreement_with_exact'] * 100:.1f} % | {v['median_ms']:.1f} |"
              for k, v in res["paths"].items()]
    return print_table(lines, res, a.json)

if __name__ == "__main__":
    sys.exit(main())
