"""Where a batch-1 inference spends its time, op by op, and whether each op runs in int8 or in float.

    python research/op_profile.py --model demo/model --model runs/flat-onnx --threads 1 --runs 20 \
        [--warmup 3] [--top 10] [--data ROOT] [--json runs/profile.json]

A table per artifact: op type, node count, ms per inference, share of the run, precision, the slowest nodes.
What each runtime can measure here (onnxruntime's profiler, ExecuTorch's ETDump, LiteRT op counts only,
Core ML nothing off macOS) is in docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters import tool_versions  # noqa: E402
from converters.benchmark.measure import RUNTIMES, pinned_threads, time_batch1  # noqa: E402

INT8, FLOAT, CONVERT, OTHER, UNKNOWN = "int8", "float", "convert", "other", "?"
PRECISION_HELP = ("int8 = integer compute (or int8 data moved); float = float compute; convert = (de)quantize or "
                  "cast between the two; other = shape/index arithmetic; ? = the runtime does not record the dtype")


class ProfileError(RuntimeError):
    """The profile cannot be taken as asked (bad arguments, no model where one was named)."""


class ProfilerUnavailable(RuntimeError):
    """The runtime runs the model here but records no per-op times; the message says what would."""


@dataclass
class OpStat:
    """All nodes of one op type and precision, per inference."""

    op_type: str
    precision: str
    count: int
    ms: float | None  # None when the runtime gives counts only
    share: float | None = None  # of the profiled whole-run time


@dataclass
class NodeStat:
    name: str
    op_type: str
    precision: str
    ms: float


@dataclass
class Profile:
    """One artifact's profile. `run_ms` is the whole inference as the runtime's profiler timed it (mean over the
    measured runs, warm-up excluded); `sdk_ms` the median through sdk.Classifier with no profiler attached."""

    path: str
    target: str
    precision: str
    runtime: str
    status: str = "per-op timing"  # | "op counts only" | "whole-model time only" | "unavailable"
    runs: int = 0
    warmup: int = 0
    threads: int = 1
    run_ms: float | None = None
    sdk_ms: float | None = None
    ops: list[OpStat] = field(default_factory=list)
    nodes: list[NodeStat] = field(default_factory=list)
    graph_ops: dict[str, int] = field(default_factory=dict)  # op types of the graph the runtime executes
    exported_ops: dict[str, int] = field(default_factory=dict)  # op types of the file as exported
    scopes: dict[str, float] = field(default_factory=dict)  # ms per model part, where node names carry one
    notes: list[str] = field(default_factory=list)

    @property
    def op_ms(self) -> float | None:
        timed = [o.ms for o in self.ops if o.ms is not None]
        return float(sum(timed)) if timed else None

    def ms_by_precision(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for o in self.ops:
            if o.ms is not None:
                out[o.precision] += o.ms
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "op_ms": self.op_ms, "ms_by_precision": self.ms_by_precision()}


def scope_of(node: str) -> str:
    """The model part an exported node belongs to, from its name ('/model/_blocks.3/…' -> '/model/_blocks'),
    so backbone and head time can be told apart; nodes the runtime created have no scope."""
    parts = node.split("/")
    if len(parts) < 3 or parts[0]:
        return "(added by the runtime)"
    return "/" + "/".join(re.sub(r"\.\d+$", "", p) for p in parts[1:-1][:2])


def aggregate(samples: Iterable[tuple[str, str, str, float]], run_ms: float | None, top: int,
              ) -> tuple[list[OpStat], list[NodeStat]]:
    """Per-op-type rows and the `top` slowest nodes from (node, op type, precision, ms per inference) samples.

    Shares are of the whole-run time when the runtime gives one, so what lies between ops stays visible."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    nodes = []
    for name, op, prec, ms in samples:
        groups[(op, prec)].append(ms)
        nodes.append(NodeStat(name, op, prec, ms))
    total = run_ms or sum(sum(v) for v in groups.values()) or 1.0
    ops = [OpStat(op, prec, len(v), float(sum(v)), float(sum(v)) / total) for (op, prec), v in groups.items()]
    ops.sort(key=lambda o: -(o.ms or 0.0))
    nodes.sort(key=lambda n: -n.ms)
    return ops, nodes[:top]


def _version(dist: str) -> str:
    return tool_versions(dist, base=(), missing="(version unknown)")[dist]


# ---- onnxruntime -------------------------------------------------------------------------------------------
_INT8_TYPES = {"int8", "uint8"}
_FLOAT_TYPES = {"float", "float16", "double", "bfloat16"}
_ONNX_QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def onnx_precision(op: str, in_types: set[str], out_types: set[str]) -> str:
    """int8 / float / convert for an onnxruntime node, from its op type and the dtypes it actually ran on.

    Quantized kernels take float scales as inputs, so the op type decides first; a node moving uint8 data
    (Transpose, MaxPool on a quantized tensor) counts as int8 because it runs on the int8 path."""
    if op in _ONNX_QDQ:
        return CONVERT
    if op.startswith("QLinear") or op in {"QGemm", "QAttention"} or "Integer" in op or op.startswith("DynamicQuantize"):
        return INT8
    if out_types and not out_types & (_INT8_TYPES | _FLOAT_TYPES):  # Shape, NonZero, ArgMax: index arithmetic
        return OTHER
    if (in_types & _INT8_TYPES and out_types & _FLOAT_TYPES) or (in_types & _FLOAT_TYPES and out_types & _INT8_TYPES):
        return CONVERT
    if in_types & _INT8_TYPES:
        return INT8
    if in_types & _FLOAT_TYPES or out_types & _FLOAT_TYPES:
        return FLOAT
    return OTHER


def _types(shapes: list[dict[str, Any]] | None) -> set[str]:
    return {t for d in shapes or [] for t in d}


def onnx_node_samples(events: list[dict[str, Any]], warmup: int) -> tuple[list[tuple[str, str, str, float]], float, int]:
    """(node, op, precision, ms per run) from an onnxruntime profile, the mean whole-run ms and the runs used.

    Node events are assigned to the `model_run` event whose interval holds them; the first `warmup` runs
    (allocation, first-touch of weights) are dropped."""
    runs = sorted((e for e in events if e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[warmup:]
    if not runs:
        raise ProfilerUnavailable("the onnxruntime profile holds no measured model_run event")
    total: dict[str, float] = defaultdict(float)
    meta: dict[str, tuple[str, str]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(r["ts"] <= e["ts"] <= r["ts"] + r["dur"] for r in runs):
            continue
        name, args = e["name"][: -len("_kernel_time")], e.get("args", {})
        op = args.get("op_name", "?")
        total[name] += e["dur"] / 1e3
        meta[name] = (op, onnx_precision(op, _types(args.get("input_type_shape")), _types(args.get("output_type_shape"))))
    n = len(runs)
    samples = [(name, *meta[name], ms / n) for name, ms in total.items()]
    return samples, float(np.mean([r["dur"] for r in runs]) / 1e3), n


def graph_op_counts(path: Path) -> dict[str, int]:
    import onnx

    return dict(Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node).most_common())


def profile_onnxruntime(prof: Profile, model: Path, image: np.ndarray, workdir: Path, top: int) -> None:
    """Run the model under onnxruntime's profiler and fill `prof`; the optimized graph ORT executes is
    saved too, so fused op types are counted as they run."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = prof.threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # the "optimized model holds hardware-specific ops" warning is expected here
    opts.enable_profiling = True
    opts.profile_file_prefix = str(workdir / "ort_profile")
    optimized = workdir / "optimized.onnx"
    opts.optimized_model_filepath = str(optimized)
    sess = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: image}
    for _ in range(prof.warmup + prof.runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    samples, prof.run_ms, n = onnx_node_samples(events, prof.warmup)
    prof.ops, prof.nodes = aggregate(samples, prof.run_ms, top)
    for name, _, _, ms in samples:
        prof.scopes[scope_of(name)] = prof.scopes.get(scope_of(name), 0.0) + ms
    prof.scopes = dict(sorted(prof.scopes.items(), key=lambda kv: -kv[1]))
    prof.graph_ops, prof.exported_ops = graph_op_counts(optimized), graph_op_counts(model)
    introduced = {k: v for k, v in prof.graph_ops.items() if k not in prof.exported_ops}
    prof.notes.append(f"graph: {sum(prof.exported_ops.values())} nodes exported, {sum(prof.graph_ops.values())} after "
                      f"onnxruntime's optimizations (level ALL); op types it introduced: "
                      + (", ".join(f"{k} {v}" for k, v in introduced.items()) or "none"))
    prof.notes.append(f"onnxruntime {ort.__version__}, CPUExecutionProvider, {n} measured runs")


# ---- ExecuTorch --------------------------------------------------------------------------------------------
_XNN_TAG = re.compile(r"\(([^)]*)\)")
_XNN_INT8 = {"QC8", "QS8", "QU8", "QD8", "QP8", "QC4", "QC4W", "QC8W", "QB4W", "X8"}
_XNN_FLOAT = {"F32", "F16", "BF16", "X32", "X16"}


def xnnpack_precision(name: str) -> str:
    """int8 / float / convert from an XNNPACK operator name such as 'Convolution (NHWC, QC8) IGEMM'.

    XNNPACK names its kernels by datatype tag (QC8 = int8 with per-channel weights, QS8 = signed int8,
    QD8 = dynamically quantized int8, F32, X32 = any 32-bit data moved); 'Convert' is a (de)quantize.
    Element-wise ops whose name carries no tag get '?' rather than a guess."""
    if name.startswith("Convert"):
        return CONVERT
    m = _XNN_TAG.search(name)
    tags = {t.strip() for t in m.group(1).split(",")} if m else set()
    if tags & _XNN_INT8:
        return INT8
    if tags & _XNN_FLOAT:
        return FLOAT
    return UNKNOWN


def portable_precision(kernel: str) -> str:
    if "quantize_per" in kernel or "dequantize" in kernel:
        return CONVERT
    return INT8 if "quantized" in kernel else UNKNOWN  # a portable event does not record its dtypes


def executorch_samples(events: list[Any], warmup: int) -> tuple[list[tuple[str, str, str, float]], float, int, int]:
    """(node, op, precision, ms per run) from the leaf ETDump events: XNNPACK ops inside delegates and portable
    kernels (`native_call_*`) outside. DELEGATE_CALL and OPERATOR_CALL wrap those leaves and are not counted
    twice; `Method::execute` is the whole run. Returns the samples, the whole-run ms, runs used, delegate calls."""
    def measured(e) -> list[float]:
        return list(e.perf_data.raw[warmup:]) if e.perf_data is not None else []

    whole = next((e for e in events if e.name == "Method::execute"), None)
    if whole is None or not measured(whole):
        raise ProfilerUnavailable("the ETDump holds no timed Method::execute event past the warm-up runs")
    n = len(measured(whole))
    samples = []
    for i, e in enumerate(events):
        times = measured(e)
        if not times:
            continue
        if e.is_delegated_op:
            op = re.sub(r"\s*#\d+$", "", e.name)
            samples.append((f"{i:03d} {e.name}", op, xnnpack_precision(op), float(np.sum(times)) / n))
        elif e.name.startswith("native_call_"):
            kernel = e.name[len("native_call_"):]
            samples.append((f"{i:03d} {kernel}", f"portable {kernel}", portable_precision(kernel), float(np.sum(times)) / n))
    delegate_calls = sum(e.name == "DELEGATE_CALL" for e in events)
    return samples, float(np.mean(measured(whole))), n, delegate_calls


def profile_executorch(prof: Profile, model: Path, image: np.ndarray, workdir: Path, top: int) -> None:
    """Run the program with ETDump enabled and read the events back with the devtools Inspector."""
    import torch
    from executorch.runtime import Runtime

    etdump = workdir / "model.etdp"
    with pinned_threads(prof.threads):
        try:
            program = Runtime.get().load_program(str(model), enable_etdump=True, debug_buffer_size=0)
        except (RuntimeError, TypeError) as e:  # a runtime built without ETDump support refuses the option
            raise ProfilerUnavailable(f"this executorch runtime cannot record ETDump ({e})") from None
        method = program.load_method("forward")
        x = torch.from_numpy(np.ascontiguousarray(image))
        for _ in range(prof.warmup + prof.runs):
            method.execute([x])
        program.write_etdump_result_to_file(str(etdump), str(workdir / "debug.bin"))
    if not etdump.is_file() or etdump.stat().st_size == 0:
        raise ProfilerUnavailable("this executorch build recorded no ETDump (built without "
                                  "EXECUTORCH_ENABLE_EVENT_TRACER); per-op times need a build with "
                                  "-DEXECUTORCH_BUILD_DEVTOOLS=ON -DEXECUTORCH_ENABLE_EVENT_TRACER=ON")
    from executorch.devtools import Inspector

    with warnings.catch_warnings():  # no ETRecord and no debug buffer: the Inspector warns it has no tensors
        warnings.simplefilter("ignore")
        inspector = Inspector(etdump_path=str(etdump))
    events = [e for block in inspector.event_blocks for e in block.events]
    samples, prof.run_ms, n, delegates = executorch_samples(events, prof.warmup)
    prof.ops, prof.nodes = aggregate(samples, prof.run_ms, top)
    prof.graph_ops = {o.op_type: o.count for o in prof.ops}
    prof.notes.append(f"executorch {_version('executorch')}: {delegates} XNNPACK delegate calls per run; "
                      f"{n} measured runs; time outside the listed ops is delegate-call and kernel-dispatch overhead")


# ---- LiteRT ------------------------------------------------------------------------------------------------
def tflite_precision(op: str, in_types: set[type], out_types: set[type]) -> str:
    """The onnxruntime rule applied to a TFLite node's operand and result dtypes."""
    def names(types: set[type]) -> set[str]:
        return {"float" if np.dtype(t).name.startswith("float") else np.dtype(t).name for t in types}

    if op in {"QUANTIZE", "DEQUANTIZE"}:
        return CONVERT
    return onnx_precision(op, names(in_types), names(out_types))


def profile_litert(prof: Profile, model: Path, image: np.ndarray, workdir: Path, top: int) -> None:
    """Op counts by type and precision from the interpreter's node list; no per-op times (see the module doc)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(model), num_threads=prof.threads)
    interp.allocate_tensors()  # the XNNPACK delegate takes its partitions here
    counts: dict[tuple[str, str], int] = defaultdict(int)
    # a semi-private accessor, but the only Python view of the nodes; it lists the flatbuffer's ops and, after
    # them, one DELEGATE node per XNNPACK partition that replaced them at load time
    for op in interp._get_ops_details():
        name = op["op_name"]
        prec = "delegate" if name == "DELEGATE" else tflite_precision(name, set(op["operand_types"]), set(op["result_types"]))
        counts[(name, prec)] += 1
    prof.ops = sorted((OpStat(op, prec, k, None) for (op, prec), k in counts.items()), key=lambda o: -o.count)
    prof.graph_ops = {o.op_type: o.count for o in prof.ops}
    prof.status = "op counts only"
    prof.notes.append(f"ai-edge-litert {_version('ai-edge-litert')}: the Python Interpreter exposes no "
                      "per-op profiler; per-op timing needs the LiteRT `benchmark_model` binary "
                      "(--graph=MODEL --num_threads=N --enable_op_profiling=true). Whole-model time: sdk ms above")


PROFILERS: dict[str, Callable[[Profile, Path, np.ndarray, Path, int], None]] = {
    "onnx": profile_onnxruntime, "executorch": profile_executorch, "tflite": profile_litert}


def profile_model(directory: str | Path, image_for: Callable[[int], np.ndarray], workdir: Path, threads: int = 1,
                  runs: int = 20, warmup: int = 3, top: int = 10) -> Profile:
    """Profile one artifact directory: verified and timed through sdk.Classifier (as a device loads it), then
    run under its runtime's profiler. A runtime that cannot run here, or records no per-op times, gives a
    profile whose status and notes say so rather than an error."""
    from sdk import BackendUnavailableError, Classifier, Manifest

    directory = Path(directory)
    manifest = Manifest.load(directory)  # ModelNotFoundError / ModelIntegrityError: the caller reports them
    root = directory if directory.is_dir() else directory.parent
    artifact = manifest.verify(root)
    prof = Profile(str(root), manifest.target, manifest.precision, RUNTIMES.get(manifest.target, manifest.target),
                   runs=runs, warmup=warmup, threads=threads)
    try:
        clf = Classifier.load(root, num_threads=threads)
    except BackendUnavailableError as e:
        prof.status = "unavailable"
        prof.notes.append(str(e))
        return prof
    image = np.ascontiguousarray(image_for(manifest.input.size)[None], dtype=np.uint8)
    prof.sdk_ms = time_batch1(clf.logprobs, image, warmup, runs)["median_ms"]
    del clf
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        PROFILERS[manifest.target](prof, artifact, image, workdir, top)
    except ProfilerUnavailable as e:
        prof.status = "whole-model time only"
        prof.notes.append(str(e))
    return prof


def _f(x: Any, fmt: str = ".4f") -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, fmt)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def format_profile(p: Profile, top: int = 10) -> str:
    """The profile as markdown: a heading line, the per-op-type table, totals by precision, the slowest nodes."""
    head = f"### {p.path} — {p.runtime}, {p.target} {p.precision}, {p.threads} thread(s): {p.status}"
    lines = [head, ""]
    if p.sdk_ms is not None:
        lines.append(f"- whole model through sdk.Classifier (no profiler): {p.sdk_ms:.2f} ms median of {p.runs} runs "
                     f"after {p.warmup} warm-up")
    if p.run_ms is not None:
        lines.append(f"- whole run under the profiler: {p.run_ms:.2f} ms mean; op times sum to {_f(p.op_ms, '.2f')} ms "
                     f"({_pct((p.op_ms or 0) / p.run_ms)}), the rest is between ops")
    by_prec = p.ms_by_precision()
    if by_prec and p.run_ms:
        lines.append("- by precision: " + ", ".join(f"{k} {v:.2f} ms ({_pct(v / p.run_ms)})" for k, v in by_prec.items()))
    if p.scopes and p.run_ms:
        lines.append("- by model part: " + ", ".join(f"{k} {v:.2f} ms ({_pct(v / p.run_ms)})" for k, v in p.scopes.items()))
    lines += [f"- {n}" for n in p.notes]
    if not p.ops:
        return "\n".join(lines)
    lines += ["", "| op type | count | ms / inference | share | precision |", "|---|---|---|---|---|"]
    lines += [f"| {o.op_type} | {o.count} | {_f(o.ms, '.3f')} | {_pct(o.share)} | {o.precision} |" for o in p.ops]
    if p.nodes:
        lines += ["", f"Slowest {min(top, len(p.nodes))} nodes:", "", "| node | op type | ms | precision |",
                  "|---|---|---|---|"]
        lines += [f"| {n.name} | {n.op_type} | {n.ms:.3f} | {n.precision} |" for n in p.nodes[:top]]
    return "\n".join(lines)


def pattern_image(size: int) -> np.ndarray:
    """A deterministic photo stand-in: smooth colour gradients with edges and texture, so no kernel sees the
    all-zero input some runtimes take a shortcut on."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    rng = np.random.default_rng(0)
    r = 255 * x
    g = 255 * y * (0.5 + 0.5 * np.sin(12 * x))
    b = 255 * ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1)
    img = np.stack([r, g, b], -1) + rng.normal(0, 12, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def input_source(data: str | None) -> tuple[Callable[[int], np.ndarray], str]:
    """The model input (one uint8 image at a given size) and a description: the first photo under `data` in
    sorted order, decoded and resized as the SDK does, or the deterministic pattern."""
    if data is None:
        return pattern_image, "deterministic test pattern"
    from sdk import IMAGE_SUFFIXES, prepare

    root = Path(data)
    if not root.is_dir():
        raise ProfileError(f"--data {data}: not a directory")
    photo = next((p for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), None)
    if photo is None:
        raise ProfileError(f"--data {data}: no image under it")
    return (lambda size: prepare(photo, size)), f"photo {photo}"


def run_profiles(models: list[str], data: str | None, threads: int, runs: int, warmup: int, top: int,
                 log=print) -> list[Profile]:
    """Profile every model directory in order, printing each table as it is done."""
    from sdk import HierfgError

    image_for, source = input_source(data)
    log(f"input: {source}, batch 1; {PRECISION_HELP}")
    out = []
    with tempfile.TemporaryDirectory(prefix="hierfg-profile-") as tmp:
        for i, model in enumerate(models):
            if not Path(model).exists():
                raise ProfileError(f"--model {model}: no such directory; pass a model directory holding manifest.json")
            try:
                prof = profile_model(model, image_for, Path(tmp) / str(i), threads, runs, warmup, top)
            except HierfgError as e:  # missing manifest, hash mismatch: the model cannot be trusted, stop
                raise ProfileError(f"--model {model}: {e}") from None
            log("")
            log(format_profile(prof, top))
            out.append(prof)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python research/op_profile.py",
                                description="Per-op time of exported artifacts, int8 vs float, per runtime.")
    p.add_argument("--model", action="append", required=True, metavar="DIR",
                   help="artifact directory (model file + manifest.json); repeat for several")
    p.add_argument("--threads", type=int, default=1, help="runtime threads (default 1)")
    p.add_argument("--runs", type=int, default=20, help="measured runs after the warm-up (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="runs left out of every figure (default 3)")
    p.add_argument("--top", type=int, default=10, help="slowest single nodes to list (default 10)")
    p.add_argument("--data", help="dataset root: profile on its first photo (default: a deterministic pattern)")
    p.add_argument("--json", help="also write the profiles to this JSON file")
    a = p.parse_args(argv)
    if a.threads < 1 or a.runs < 1 or a.warmup < 0 or a.top < 0:
        p.error("--threads and --runs must be >= 1, --warmup and --top >= 0")
    try:
        profiles = run_profiles(a.model, a.data, a.threads, a.runs, a.warmup, a.top)
    except ProfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        path = Path(a.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([x.to_dict() for x in profiles], indent=1))
        print(f"wrote {len(profiles)} profile(s) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
