"""Does onnxruntime's int8 convolution saturate on this CPU? One 3x3 convolution, real photos, four schemes.

Builds a one-convolution ONNX graph (uint8 NHWC photo in, /255, Conv 3 -> 8 channels, 3x3, fixed
seed weights), calibrates it with `quantize.onnx.quantize_graph` on real Grocery training photos, and
runs each int8 scheme with onnxruntime's graph optimizations on (fused int8 kernels, what deploys)
and off (QDQ executed as dequantize -> float conv -> quantize). Prints, per scheme, the zero-point
types written and the max |int8 - fp32| as a share of the fp32 output's max |value|:

    python research/onnx_int8_saturation.py --data $G [--json out.json]

A scheme that is accurate with optimizations off but not on is the kernel, not the quantization: on
x86 without VNNI, U8S8 (and S8S8, which onnxruntime runs through the same kernels) add pairs of
uint8 x int8 products in int16 and saturate.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from research.onnx_int8_schemes import ONNX_SCHEMES as SCHEMES, quantize_options  # noqa: E402  (after the path insert)

SIZE = 32


def one_conv_graph(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(0, 0.2, (8, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
         helper.make_node("Cast", ["xt"], ["xf"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["xf", "s"], ["xs"]),
         helper.make_node("Conv", ["xs", "w"], ["y"], pads=[1, 1, 1, 1])],
        "one_conv", [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8, SIZE, SIZE])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(1 / 255, np.float32), "s")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def zero_point_types(path: Path) -> list[str]:
    import onnx
    from onnx import TensorProto

    q = onnx.load(str(path))
    inits = {i.name: i for i in q.graph.initializer}
    names = {TensorProto.UINT8: "uint8", TensorProto.INT8: "int8"}
    return sorted({names[inits[n.input[2]].data_type] for n in q.graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits})


def measure(data: str, schemes: list[str], n_photos: int = 10) -> dict:
    import onnxruntime as ort

    from quantize.onnx import quantize_graph
    from sdk import prepare
    from train.data import load_dataset

    ds = load_dataset(data, "train")
    photos = np.stack([prepare(s.source, SIZE) for s in ds.samples[::max(1, len(ds) // n_photos)][:n_photos]])

    def run(path: Path, optimize: bool) -> np.ndarray:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": photos})[0]

    out = {"photos": len(photos), "size": SIZE, "schemes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "fp32.onnx"
        one_conv_graph(src)
        ref = run(src, True)
        scale = float(np.abs(ref).max())
        half = len(photos) // 2
        for name in schemes:
            k = SCHEMES[name]
            dst = Path(tmp) / f"{name}.onnx"
            quantize_graph(src, dst, "x", [photos[:half], photos[half:]], ops=["Conv"], **quantize_options(k))
            out["schemes"][name] = {
                **k, "zero_point_types": zero_point_types(dst),
                "max_error_optimized": float(np.abs(run(dst, True) - ref).max()) / scale,
                "max_error_unoptimized": float(np.abs(run(dst, False) - ref).max()) / scale}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset root (real photos calibrate and feed the graph)")
    p.add_argument("--schemes", default=",".join(SCHEMES), help=f"subset of {','.join(SCHEMES)}")
    p.add_argument("--json", help="also write the measurements here")
    args = p.parse_args(argv)
    schemes = args.schemes.split(",")
    unknown = sorted(set(schemes) - set(SCHEMES))
    if unknown:
        p.error(f"unknown scheme(s) {unknown}; schemes: {','.join(SCHEMES)}")
    if not Path(args.data).is_dir():
        p.error(f"{args.data}: not a directory")
    warnings.simplefilter("ignore")
    from sdk._backends import cpu_has_vnni

    res = measure(args.data, schemes)
    res["vnni"] = cpu_has_vnni()  # None: not Linux, unknown
    print(f"one 3x3 conv, {res['photos']} real photos at {SIZE} px; VNNI: "
          f"{ {True: 'yes', False: 'no', None: 'unknown'}[res['vnni']] }")
    for name, r in res["schemes"].items():
        print(f"{name:8s} zero points {'/'.join(r['zero_point_types']):10s} "
              f"max error {r['max_error_optimized'] * 100:5.1f} % "
              f"(graph optimizations off: {r['max_error_unoptimized'] * 100:4.1f} %)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
