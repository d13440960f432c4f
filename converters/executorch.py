"""ExecuTorch (.pte): torch.export -> to_edge_transform_and_lower(XnnpackPartitioner) -> to_executorch.

Every convolution, linear and matmul must land in the XNNPACK delegate (asserted); only the ops of
PORTABLE_ALLOWED may stay on the portable kernels: LayerNorm, the read-out's sum and log-softmax, and data
movement. Two decompositions run before lowering: SDPA to matmul -> softmax -> matmul (the default goes
through `_safe_softmax`, whose masked-row guard XNNPACK cannot take; the model passes no mask), and tanh
GELU to tanh/mul/add (XNNPACK's GeluConfig, executorch 1.5.1, takes every `aten.gelu` and runs exact erf GELU,
ignoring `approximate`: ~3e-4 max |Δ log-prob| instead of ~1e-6).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from sdk import atomic_write

from ._common import Artifact, ExportError, ExportSpec, begin_export, example_images, finish_export, tool_versions


PORTABLE_ALLOWED = frozenset({
    "aten.native_layer_norm.default",
    "aten.sum.dim_IntList", "aten._log_softmax.default",
    "aten.expand_copy.default", "aten.unsqueeze_copy.default", "aten.select_copy.int", "aten.permute_copy.default",
    "aten.index_select.default", "aten.view_copy.default", "aten.clone.default",
    "dim_order_ops._to_dim_order_copy.default", "dim_order_ops._clone_dim_order.default",
})
_DELEGATE_PLUMBING = frozenset({"executorch_call_delegate", "getitem"})


def _sdpa_plain(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is not None or is_causal or dropout_p != 0.0 or enable_gqa:
        raise ExportError("executorch: SDPA with a mask, causal flag, dropout or GQA is not expected in the "
                          "deploy graph; extend converters.executorch._sdpa_plain before exporting it")
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * s, dim=-1), v)


def _gelu_tanh(x, approximate="none"):
    if approximate != "tanh":
        return NotImplemented  # exact GELU is what XNNPACK computes: keep the op
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def _op_name(target) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return name.split(":")[0].replace("<EdgeOpOverload: ", "").strip(">")


def _called_ops(graph_module: torch.fx.GraphModule) -> list[str]:
    return [_op_name(n.target) for n in graph_module.graph.nodes if n.op == "call_function"]


def outside_delegate(graph_module: torch.fx.GraphModule) -> Counter:
    """Counts of the ops of a lowered graph that run outside any delegate (delegate plumbing excluded)."""
    return Counter(op for op in _called_ops(graph_module) if op not in _DELEGATE_PLUMBING)


def delegate_count(graph_module: torch.fx.GraphModule) -> int:
    return _called_ops(graph_module).count("executorch_call_delegate")


def check_delegation(ops: Counter, allowed: frozenset[str] = PORTABLE_ALLOWED) -> None:
    """Raise ExportError naming every op left outside XNNPACK that is not on the allowlist."""
    bad = {k: v for k, v in ops.items() if k not in allowed}
    if bad:
        raise ExportError(f"executorch: ops left outside the XNNPACK delegate that are not allowed on the portable "
                          f"path: {dict(sorted(bad.items()))}; allowed: {sorted(allowed)}")


def lower_to_xnnpack(program: torch.export.ExportedProgram):
    """SDPA and tanh GELU decomposed (module docstring), then lowered into the XNNPACK delegate:
    (edge program manager, counts of the ops left outside it). Delegation is not judged here
    (`check_delegation`)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torch.export import default_decompositions

    table = default_decompositions()
    table[torch.ops.aten.scaled_dot_product_attention.default] = _sdpa_plain
    table[torch.ops.aten.gelu.default] = _gelu_tanh
    edge = to_edge_transform_and_lower(program.run_decompositions(table), partitioner=[XnnpackPartitioner()])
    return edge, outside_delegate(edge.exported_program().graph_module)


def export(model: torch.nn.Module, spec: ExportSpec, out_dir: str | Path) -> Artifact:
    """Export a DeployWrapper-wrapped model (uint8 NHWC in) to `<out_dir>/model.pte` + manifest."""
    out_dir, opts, _ = begin_export("executorch", model, spec, out_dir)
    path = out_dir / "model.pte"
    try:
        edge, portable = lower_to_xnnpack(torch.export.export(model, (example_images(spec, opts["batch"]),)))
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"executorch lowering failed: {type(e).__name__}: {e}") from e
    check_delegation(portable)
    try:
        program = edge.to_executorch()
    except Exception as e:
        raise ExportError(f"executorch to_executorch failed: {type(e).__name__}: {e}") from e
    atomic_write(path, program.buffer)
    export = {"fixed_batch": int(opts["batch"]), "delegate": "XnnpackPartitioner",
              "delegate_segments": delegate_count(edge.exported_program().graph_module),
              "portable_ops": dict(sorted(portable.items())), "thread_safe": False}
    return finish_export("executorch", model, path, spec, tool_versions("executorch"), {"export": export})
