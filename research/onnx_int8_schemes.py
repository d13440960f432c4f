"""Which onnxruntime int8 scheme holds the fp32 answers on this CPU?

Quantizes one fp32 ONNX export (`python -m converters onnx`, or the `fp32/onnx/model.onnx` that
`python -m quantize` writes) with `quantize_static` in several schemes, on the same 300 real
calibration photos `python -m quantize` uses, and prints for each: fine top-1 agreement with the
fp32 graph on a split (default val) and the batch-1, 1-thread median latency.

    python research/onnx_int8_schemes.py --onnx runs/int8/fp32/onnx/model.onnx \\
        --taxonomy runs/student/taxonomy.json --data $G

Schemes: u8s8 (`python -m quantize`'s scheme with every family int8, attention matmuls included),
u8s8-rr (reduce_range: 7-bit weights), u8u8 (uint8 weights), s8s8 (int8 activations and weights),
u8s8-noPadAdd (backbone Pad/Add left float), head-only (backbone left float). `python -m quantize`
quantizes the graph after onnxruntime's pre-process pass, `<out>/fp32/onnx-preprocessed.onnx`: pass
that file to judge exactly it. With bias correction (the default) that graph is the bias-corrected
model's: pass the plain fp32 export as `--reference` so agreement is measured against what deploys in fp32.
On x86 CPUs without VNNI, U8S8 convolutions saturate in int16 (the onnxruntime docs' caveat); S8S8 runs
through the same kernels.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# onnxruntime int8 schemes by name: activation / weight types and 7-bit weights. "u8s8" is what
# `python -m quantize` writes (ORT's fast x86/ARM kernels; "u8s8-rr" was its removed --onnx-reduce-range)
ONNX_SCHEMES: dict[str, dict] = {
    "u8s8": {"activations": "uint8", "weights": "int8", "reduce_range": False},
    "u8s8-rr": {"activations": "uint8", "weights": "int8", "reduce_range": True},
    "s8s8": {"activations": "int8", "weights": "int8", "reduce_range": False},
    "u8u8": {"activations": "uint8", "weights": "uint8", "reduce_range": False},
}
# the kernel schemes, plus two u8s8 variants that leave parts of the graph float
SCHEMES = ("u8s8", "u8s8-rr", "u8u8", "s8s8", "u8s8-noPadAdd", "head-only")
FLOAT_PARTS = {"u8s8-noPadAdd": "u8s8", "head-only": "u8s8"}
CALIBRATE_METHODS = ("MinMax", "Entropy", "Percentile", "Distribution")


def quantize_options(scheme: dict, method: str = "MinMax") -> dict:
    """`quantize.onnx.quantize_graph`'s `quantize_static` options for an `ONNX_SCHEMES` entry and calibration method."""
    from onnxruntime.quantization import CalibrationMethod, QuantType
    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    return {"activation_type": types[scheme["activations"]], "weight_type": types[scheme["weights"]],
            "reduce_range": scheme["reduce_range"], "calibrate_method": getattr(CalibrationMethod, method)}


def main(argv: list[str] | None = None) -> int:
    import onnx
    import onnxruntime as ort

    from converters.benchmark import time_batch1
    from quantize.calibration import calibration_sets, evaluation_sets
    from quantize.onnx import BACKBONE_NODE_PREFIXES, QUANTIZED_OPS, excluded_nodes, quantize_graph
    from quantize.sensitivity import fine_kl
    from sdk import Taxonomy

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx", required=True, help="fp32 ONNX export")
    p.add_argument("--reference", help="fp32 graph whose answers the schemes are judged against (default: --onnx; "
                   "pass fp32/onnx/model.onnx when --onnx is the bias-corrected graph)")
    p.add_argument("--taxonomy", required=True, help="the model's taxonomy.json")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--split", default="val", choices=["val", "train20"], help="judging set (default val)")
    p.add_argument("--schemes", default=",".join(SCHEMES), help=f"subset of {','.join(SCHEMES)}")
    p.add_argument("--size", type=int, default=0, help="input size (default: read from the graph's input)")
    p.add_argument("--calibration-images", type=int, default=300,
                   help="real training photos to calibrate on (default 300, as python -m quantize)")
    p.add_argument("--limit", type=int, default=0, help="judge on at most N photos of the split (0: all)")
    p.add_argument("--calibrate-methods", default="MinMax",
                   help=f"comma-separated onnxruntime calibration methods, each a row per scheme: "
                        f"{','.join(CALIBRATE_METHODS)} (default MinMax, as python -m quantize). onnxruntime's "
                        f"histogram methods keep every intermediate output of every calibration batch in memory: "
                        f"on this student 300 photos need over 22 GB, 60 photos about 5 GB")
    args = p.parse_args(argv)
    for f in (args.onnx, args.reference, args.taxonomy):
        if f and not Path(f).is_file():
            p.error(f"{f}: no such file")
    unknown = sorted(set(args.schemes.split(",")) - set(SCHEMES))
    if unknown:
        p.error(f"unknown scheme(s) {unknown}; schemes: {','.join(SCHEMES)}")
    methods = [m.strip() for m in args.calibrate_methods.split(",") if m.strip()]
    if not methods or set(methods) - set(CALIBRATE_METHODS):
        p.error(f"--calibrate-methods: choose from {','.join(CALIBRATE_METHODS)}")
    warnings.simplefilter("ignore")

    tax = Taxonomy.load(args.taxonomy)
    proto = onnx.load(args.onnx)
    size = args.size or proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value  # NHWC uint8 image input
    cal, _ = calibration_sets(args.data, size, tax, n_calibration=args.calibration_images, n_sensitivity=0)
    ev = evaluation_sets(args.data, size, tax, limit=args.limit)[args.split]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1

    def run(path: str) -> tuple[np.ndarray, float]:
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        fine = [f"logp_{tax.level_names[-1]}"]  # by name: newer exports add the embedding after the levels
        lp = np.concatenate([s.run(fine, {name: ev.images[i:i + 8]})[0] for i in range(0, len(ev.images), 8)])
        t = time_batch1(lambda x: s.run(None, {name: x}), ev.images, warmup=10, repeats=40)
        return lp.astype(np.float64), t["median_ms"]

    ref_lp, ms = run(args.reference or args.onnx)
    ref = ref_lp.argmax(1)
    print(f"fp32: {ms:.2f} ms/img; judging on {ev.source} ({len(ref)} photos)")
    if args.reference:
        src, _ = run(args.onnx)
        print(f"quantized graph before int8: fine agreement with the reference {np.mean(src.argmax(1) == ref) * 100:5.1f} %")
    base, _ = excluded_nodes(proto, quantize_attention=True)
    batches = [cal.images[i:i + 10] for i in range(0, len(cal.images), 10)]
    with tempfile.TemporaryDirectory() as tmp:
        for scheme, method in ((s, m) for s in args.schemes.split(",") for m in methods):
            ops = [o for o in QUANTIZED_OPS if not (scheme == "u8s8-noPadAdd" and o in ("Pad", "Add"))]
            excl = base + ([n.name for n in proto.graph.node if n.name.startswith(BACKBONE_NODE_PREFIXES)]
                           if scheme == "head-only" else [])
            out = Path(tmp) / f"{scheme}-{method}.onnx"
            k = ONNX_SCHEMES[FLOAT_PARTS.get(scheme, scheme)]
            # the histogram collectors stack the batches' outputs: equal sizes only
            cal_batches = batches if method == "MinMax" else [b[i:i + 1] for b in batches for i in range(len(b))]
            quantize_graph(args.onnx, out, proto.graph.input[0].name, cal_batches, excl, ops=ops,
                           **quantize_options(k, method))
            lp, ms = run(str(out))
            fine = lp.argmax(1)
            kl = fine_kl([ref_lp], [lp])  # mean fine KL(fp32 || int8), as python -m quantize reports it
            print(f"{scheme:14s} {method:12s} fine agreement with fp32 {np.mean(fine == ref) * 100:6.2f} % "
                  f"({int(np.sum(fine != ref))} changed), KL {kl:.1e}, fine-argmax top-1 fp32 {np.mean(ref == ev.labels[:, -1]) * 100:.1f} % "
                  f"-> int8 {np.mean(fine == ev.labels[:, -1]) * 100:.1f} %   {ms:.2f} ms/img", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
