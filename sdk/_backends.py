"""Runtime backends. Each imports its runtime lazily, so the SDK needs only the one the artifact uses.

A backend takes a uint8 NHWC batch and returns one (batch, n_level) float array per level.
"""

from __future__ import annotations

import importlib
import platform
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Generic, Sequence, TypeVar

import numpy as np

from ._errors import Int8FallbackWarning, ModelIntegrityError
from ._manifest import Manifest

T = TypeVar("T")


class Registry(Generic[T]):
    """A small name -> factory registry (timm/torchvision style) that refuses duplicate names."""

    def __init__(self, kind: str, missing: type[Exception] = ValueError):
        self.kind = kind
        self._missing = missing
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register under `name`; a second registration of the same name is an error."""
        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj
        return deco

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise self._missing(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items)


class BackendUnavailableError(ModelIntegrityError):
    """The artifact is intact, but its runtime cannot run here (package missing, or wrong OS)."""


_BACKENDS: Registry = Registry("backend", missing=ModelIntegrityError)
register_backend = _BACKENDS.register


def available_backends() -> list[str]:
    return _BACKENDS.names()


class Backend:
    """Base class. `thread_safe` False: the Classifier serializes calls. A subclass loads its artifact in
    `_load`; whatever the runtime raises there becomes a `ModelIntegrityError`."""

    thread_safe = True
    fixed_batch: int | None = None  # set when the artifact only accepts one batch size
    runtime = "the runtime"  # who could not load the artifact, in the error message

    def __init__(self, path: Path, manifest: Manifest, num_threads: int | None):
        self.path = path
        self.manifest = manifest
        try:
            self._load(path, manifest, int(num_threads or 1))
        except ModelIntegrityError:
            raise
        except Exception as e:
            raise ModelIntegrityError(f"{path}: {self.runtime} could not load the model ({e})") from None

    def _load(self, path: Path, manifest: Manifest, num_threads: int) -> None:
        pass

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Outputs for a batch of any size (split into `fixed_batch` rows when the artifact needs it)."""
        if self.fixed_batch:
            return run_in_fixed_batches(self._run_one, batch, self.fixed_batch)
        return self._run_one(batch)

    def _run_one(self, batch: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def _check_input(self, shape: Sequence[int], dtype: str = "uint8") -> None:
        s, shape = self.manifest.input.size, [int(n) for n in shape]
        if dtype != "uint8" or shape[1:] != [s, s, 3]:
            raise ModelIntegrityError(f"{self.path}: input is {dtype}{shape}, the manifest says uint8 [N, {s}, {s}, 3]")

    def _check_outputs(self, found: list[str] | int) -> None:
        """The runtime's outputs against the manifest's: the same names, or the same count where the
        runtime does not keep the exported names."""
        want = self.manifest.graph_outputs
        if found != (want if isinstance(found, list) else len(want)):
            raise ModelIntegrityError(f"{self.path}: the model has outputs {found}, the manifest lists {want}")


def _runtime(module: str, what: str, install: str) -> Any:
    """Import a runtime package the artifact needs, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailableError(f"the {what} backend needs {install}: pip install {install}") from e


_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})  # cpuinfo flags of the int8 dot-product instruction


def cpu_has_vnni(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU has VNNI (`avx512_vnni` / `avx_vnni` in the Linux cpuinfo flags); None if unknown."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(set(line.split(":", 1)[-1].split()) & VNNI_FLAGS)
    return None


_DETECT = object()


def int8_saturation_risk(manifest: Manifest, machine: str | None = None, vnni=_DETECT) -> str | None:
    """Why onnxruntime's fused int8 kernels would change this int8 ONNX artifact's answers on this CPU, or None:
    signed int8 weights on x86 without VNNI run through kernels that add pairs of uint8 x int8 products in
    int16 and saturate. `machine` and `vnni` (True / False / None for unknown) default to this machine's."""
    if manifest.target != "onnx" or manifest.precision != "int8":
        return None
    q = manifest.metrics.get("quantization") or {}
    types = q.get("onnx_types")
    signed = types.get("weights") == "int8" if isinstance(types, dict) else "S8 weights" in str(q.get("scheme", ""))
    if not signed or (machine or platform.machine()).lower() not in _X86:
        return None
    if (cpu_has_vnni() if vnni is _DETECT else vnni) is not False:
        return None  # VNNI present, or unknown (not Linux): no evidence of a problem
    return ("int8 ONNX model with signed int8 weights on an x86 CPU without VNNI: onnxruntime's fused int8 "
            "convolutions saturate in int16 here and change answers (this project's Grocery student: 84 % fine "
            "agreement), so the SDK keeps the graph's quantize/dequantize nodes and runs float operators between "
            "them: the int8 model's answers at about the fp32 export's speed. On this CPU the TFLite or "
            "ExecuTorch int8 artifact is faster.")


def run_in_fixed_batches(run_one, batch: np.ndarray, fixed: int) -> list[np.ndarray]:
    """Run `run_one` (which takes exactly `fixed` rows) over any batch: split, zero-pad the last chunk, trim."""
    parts = []
    for i in range(0, batch.shape[0], fixed):
        chunk = batch[i:i + fixed]
        k = chunk.shape[0]
        padded = np.concatenate([chunk, np.zeros((fixed - k, *chunk.shape[1:]), chunk.dtype)])
        parts.append([np.asarray(o)[:k] for o in run_one(padded)])
    return concat_levels(parts)


def concat_levels(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Per-level outputs of consecutive batches joined into one array per level."""
    return [np.concatenate([p[l] for p in parts]) for l in range(len(parts[0]))]


@register_backend("onnx")
class OnnxRuntimeBackend(Backend):
    thread_safe = True  # InferenceSession.run is documented as thread-safe
    runtime = "onnxruntime"

    def _load(self, path: Path, manifest: Manifest, num_threads: int) -> None:
        ort = _runtime("onnxruntime", "ONNX", "onnxruntime")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only: unused-initializer warnings are noise on a device
        risk = int8_saturation_risk(manifest)
        if risk:  # no fused QDQ kernels: DequantizeLinear -> float op -> QuantizeLinear keeps int8's rounding
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        if risk:  # stacklevel: the caller of Classifier.load
            warnings.warn(f"{path}: {risk}", Int8FallbackWarning, stacklevel=4)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._check_outputs(self.output_names)

    def _run_one(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: batch})


@register_backend("tflite")
class LiteRtBackend(Backend):
    """ai-edge-litert's Interpreter: it holds its tensors in place, so calls are serialized."""

    thread_safe = False
    runtime = "the LiteRT interpreter"

    def _load(self, path: Path, manifest: Manifest, num_threads: int) -> None:
        Interpreter = _runtime("ai_edge_litert.interpreter", "TFLite", "ai-edge-litert").Interpreter
        self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        sigs = self.interpreter.get_signature_list()
        if len(sigs) != 1:
            raise ValueError(f"expected one signature, found {sorted(sigs)}")
        self.runner = self.interpreter.get_signature_runner(next(iter(sigs)))
        (self.input_name, inp), = self.runner.get_input_details().items()
        self._check_input(inp["shape"], np.dtype(inp["dtype"]).name)
        self.fixed_batch = int(inp["shape"][0])
        # litert-torch names the tuple outputs output_0, output_1, ...: order by that number (output_10 after
        # output_9, so shorter names first), not by dict order
        self.output_keys = sorted(self.runner.get_output_details(), key=lambda n: (len(n), n))
        self._check_outputs(len(self.output_keys))

    def _run_one(self, batch: np.ndarray) -> list[np.ndarray]:
        out = self.runner(**{self.input_name: np.ascontiguousarray(batch, dtype=np.uint8)})
        # the runner returns views into interpreter memory: copy before the next call overwrites them
        return [np.array(out[k], copy=True) for k in self.output_keys]


@register_backend("executorch")
class ExecuTorchBackend(Backend):
    """executorch.runtime (pybindings). A loaded Method reuses its planned memory: calls are serialized."""

    thread_safe = False
    runtime = "the ExecuTorch runtime"

    def _load(self, path: Path, manifest: Manifest, num_threads: int) -> None:
        # the one place the SDK touches torch: ExecuTorch's Python runtime takes tensors
        self._torch = _runtime("torch", "ExecuTorch", "torch")
        runtime = _runtime("executorch.runtime", "ExecuTorch", "executorch")
        self.method = runtime.Runtime.get().load_program(str(path)).load_method("forward")
        in_sizes = list(self.method.metadata.input_tensor_meta(0).sizes())
        self._check_input(in_sizes)
        self._check_outputs(self.method.metadata.num_outputs())
        self.fixed_batch = int(in_sizes[0])

    def _run_one(self, batch: np.ndarray) -> list[np.ndarray]:
        x = self._torch.from_numpy(np.ascontiguousarray(batch, dtype=np.uint8))
        return [o.detach().numpy().copy() for o in self.method.execute([x])]


@register_backend("coreml")
class CoreMLBackend(Backend):
    """coremltools' MLModel, behind a lock. Prediction needs macOS: elsewhere loading raises
    `BackendUnavailableError` after the integrity check."""

    thread_safe = False
    runtime = "coremltools"

    def _load(self, path: Path, manifest: Manifest, num_threads: int) -> None:
        if sys.platform != "darwin":
            raise BackendUnavailableError(
                f"{path}: Core ML prediction needs macOS (the Core ML framework); this is {sys.platform}. "
                "Run this artifact on a Mac/iOS device, or load the onnx/tflite/executorch export here")
        ct = _runtime("coremltools", "Core ML", "coremltools")
        self.model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
        spec = self.model.get_spec()
        self.input_name = spec.description.input[0].name
        self.fixed_batch = int(spec.description.input[0].type.multiArrayType.shape[0])
        self.output_names = [o.name for o in spec.description.output]
        self._check_outputs(self.output_names)

    def _run_one(self, batch: np.ndarray) -> list[np.ndarray]:
        # Core ML I/O has no uint8: the package takes float32 pixel values 0..255 (see converters/coreml.py)
        out = self.model.predict({self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return [np.asarray(out[n]) for n in self.output_names]


class LockedBackend(Backend):
    """Wraps a backend whose runtime object must not be used from two threads at once."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.manifest = inner.manifest
        self.fixed_batch = inner.fixed_batch
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            return self.inner.run(batch)
