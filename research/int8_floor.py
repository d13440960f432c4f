"""How fast can an int8 model with this backbone be? The headless floor under the latency ratio bar.

    python research/int8_floor.py --flat runs/flat-onnx --student demo/model --data $G \
        [--calibration 300] [--threads 1] [--rounds 5] [--repeats 100] [--json runs/int8-floor.json]

The bar asks the int8 query student for at most half the latency of the flat Lite0 fp32 peer. Any such
student runs the peer's backbone *plus* a head, so the flat peer quantized whole (every Conv, Pad, Add
and the classifier in int8, nothing kept float, with the product's ONNX recipe: ORT's pre-pass, the
same-padding folded, QDQ U8S8 per channel, MinMax on real training photos) is a lower bound for it. If
that floor alone is over 0.5x, no head meets the bar on this runtime.

The three graphs (flat fp32, flat int8, the student's int8) are timed through onnxruntime at batch 1
in interleaved rounds, so a drift of the machine's speed hits all three alike. Accuracy is not measured
here: the flat graph's weights do not change its latency.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def calibration_photos(root: str, n: int, size: int) -> np.ndarray:
    """`n` training photos spread over the classes, as the model's uint8 NHWC input."""
    from sdk._image import prepare
    from sdk.datasets import load_dataset

    ds = load_dataset(root, "train")
    idx = np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int)
    return np.stack([prepare(ds.samples[i].source, size) for i in idx])


def quantize_whole(fp32_onnx: Path, dst: Path, photos: np.ndarray) -> Path:
    """The fp32 graph quantized with nothing kept float (the product's ONNX recipe otherwise)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from quantize.onnx import fold_pads, quantize_graph

    dst.mkdir(parents=True, exist_ok=True)
    pre = dst / "preprocessed.onnx"
    quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=False)
    proto = onnx.load(str(pre))
    folded = fold_pads(proto)
    onnx.save(proto, str(pre))
    out = dst / "model.onnx"
    batches = [photos[i:i + 16] for i in range(0, len(photos), 16)]
    quantize_graph(pre, out, proto.graph.input[0].name, batches, exclude=())
    q = onnx.load(str(out))
    print(f"{fp32_onnx}: {folded} pads folded; int8 graph with "
          f"{sum(n.op_type == 'QuantizeLinear' for n in q.graph.node)} QuantizeLinear nodes -> {out}")
    return out


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return lambda x: s.run(None, {name: x})


def main(argv: list[str] | None = None) -> int:
    from converters.benchmark.measure import pinned_threads, time_batch1
    from sdk import Manifest

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flat", required=True, help="fp32 ONNX artifact directory of the flat peer")
    ap.add_argument("--student", required=True, help="int8 ONNX artifact directory of the query student")
    ap.add_argument("--data", required=True, help="dataset root (training photos calibrate)")
    ap.add_argument("--out", default="runs/int8-floor", help="where the flat int8 graph is written")
    ap.add_argument("--calibration", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--repeats", type=int, default=100, help="timed calls per model and round")
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    flat, student = Path(a.flat), Path(a.student)
    size = Manifest.load(flat).input.size
    photos = calibration_photos(a.data, a.calibration, size)
    flat8 = quantize_whole(flat / Manifest.load(flat).file, Path(a.out), photos)
    graphs = {"flat fp32": flat / Manifest.load(flat).file, "flat int8 (no head)": flat8,
              "student int8": student / Manifest.load(student).file}
    times: dict[str, list[float]] = {k: [] for k in graphs}
    with pinned_threads(a.threads, executorch=False):
        runs = {k: session(p, a.threads) for k, p in graphs.items()}
        for _ in range(a.rounds):
            for k, run in runs.items():
                times[k].append(time_batch1(run, photos[:32], warmup=10, repeats=a.repeats)["median_ms"])
    ms = {k: float(np.median(v)) for k, v in times.items()}
    ref = ms["flat fp32"]
    print(f"| graph | ms p50 (median of {a.rounds} rounds) | x flat fp32 |\n|---|---|---|")
    for k, v in ms.items():
        print(f"| {k} | {v:.2f} | {v / ref:.2f} |")
    head = ms["student int8"] - ms["flat int8 (no head)"]
    print(f"the student's int8 head and float islands cost {head:.2f} ms over the headless int8 floor; "
          f"half the flat fp32 peer is {ref / 2:.2f} ms, {ref / 2 - ms['flat int8 (no head)']:+.2f} ms from the floor")
    if a.json:
        Path(a.json).write_text(json.dumps({"ms": ms, "rounds": times, "threads": a.threads}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
