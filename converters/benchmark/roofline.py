"""The machine line and a compute roofline: this CPU's peak MAC rate, read from its /proc/cpuinfo
flags (vector width, FMA pipes, VNNI; the derivation is in docs/benchmark.md), and the model's MACs.
They are compute-only ceilings: a ratio well below 1 says memory, depthwise convolutions or per-operator
overhead at batch 1 bound the model."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from sdk import VNNI_FLAGS

from .._common import tool_versions
from .measure import Row

VERSION_PACKAGES = ("numpy", "torch", "onnxruntime", "ai-edge-litert", "executorch", "coremltools")


def read_cpuinfo(path: str | os.PathLike = "/proc/cpuinfo") -> dict[str, Any]:
    """Model name, vendor, logical CPUs, physical cores, MHz and flags of the first CPU entry."""
    p = Path(path)
    if not p.is_file():  # not Linux: what the platform module knows, no flags
        return {"model": platform.processor() or platform.machine(), "vendor": "", "logical_cpus": os.cpu_count() or 1,
                "cores": os.cpu_count() or 1, "mhz": float("nan"), "flags": []}
    blocks = [b for b in p.read_text().split("\n\n") if b.strip()]
    first = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in blocks[0].splitlines())}
    cores = int(first.get("cpu cores", 0)) * max(1, len({b.split("physical id")[1].split("\n")[0]
                                                          for b in blocks if "physical id" in b}))
    return {"model": first.get("model name", "unknown"), "vendor": first.get("vendor_id", ""),
            "logical_cpus": len(blocks), "cores": cores or len(blocks), "mhz": float(first.get("cpu MHz", "nan")),
            "flags": first.get("flags", "").split()}


def peak_macs(cpu: dict[str, Any], fma_pipes: int = 2) -> dict[str, Any]:
    """Peak fp32 and int8 MACs/s of one core and of all cores, with the derivation as text."""
    flags = set(cpu["flags"])
    ghz = cpu["mhz"] / 1000.0
    if "avx512f" in flags and "AMD" not in cpu["vendor"]:
        bits, why = 512, "AVX-512 with 512-bit FMA pipes (Intel)"
    elif "avx2" in flags and "fma" in flags:
        bits = 256
        why = ("AVX2 + FMA" + (" (AVX-512 present but AMD executes it as two 256-bit halves)"
                               if "avx512f" in flags else ""))
    else:
        bits, why = 128, "SSE only (no AVX2 + FMA)"
    fp32_per_cycle = fma_pipes * bits // 32
    vnni = bool(flags & VNNI_FLAGS)
    int8_mult = 4.0 if vnni else 4.0 / 3.0
    int8_why = ("VNNI present (vpdpbusd: 4 int8 MACs per 32-bit lane per instruction) -> 4x fp32" if vnni else
                "no VNNI (vpmaddubsw + vpmaddwd + vpaddd: 32 MACs per 3 instructions vs 8 per FMA) -> 4/3 x fp32")
    one = {"fp32": ghz * 1e9 * fp32_per_cycle, "int8": ghz * 1e9 * fp32_per_cycle * int8_mult}
    return {
        "ghz": ghz, "fma_pipes": fma_pipes, "vector_bits": bits, "vnni": vnni,
        "fp32_macs_per_cycle": fp32_per_cycle, "int8_macs_per_cycle": fp32_per_cycle * int8_mult,
        "per_core_macs_per_s": one,
        "all_cores_macs_per_s": {k: v * cpu["cores"] for k, v in one.items()},
        "derivation": (f"{cpu['cores']} cores x {ghz:.3f} GHz (cpu MHz of /proc/cpuinfo) x {fma_pipes} FMA pipes x "
                       f"{bits}/32 fp32 lanes = {fp32_per_cycle} fp32 MACs/cycle/core [{why}]; int8: {int8_why}"),
    }


def machine_info(threads: int) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, versions, thread count."""
    cpu = read_cpuinfo()
    versions = {"python": sys.version.split()[0], **tool_versions(*VERSION_PACKAGES, base=(), missing="absent")}
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16") if f in cpu["flags"]]
    return {"cpu": cpu["model"], "vendor": cpu["vendor"], "cores": cpu["cores"], "logical_cpus": cpu["logical_cpus"],
            "mhz": cpu["mhz"], "simd": simd, "os": platform.platform(), "threads": threads, "versions": versions,
            "peak": peak_macs(cpu)}


def machine_line(info: dict[str, Any]) -> str:
    v = info["versions"]
    return (f"machine: {info['cpu']} ({info['vendor']}), {info['cores']} cores @ {info['mhz'] / 1000:.2f} GHz, "
            f"SIMD {'+'.join(info['simd']) or 'none'}; python {v['python']}, torch {v['torch']}, "
            f"onnxruntime {v['onnxruntime']}, ai-edge-litert {v['ai-edge-litert']}, executorch {v['executorch']}; "
            f"threads={info['threads']}")


def count_macs(model_config: dict[str, Any], taxonomy) -> int:
    """MACs of one image through the exported graph (DeployWrapper at batch 1) = FLOPs / 2.

    Weights do not change the count, so the model is rebuilt from its config without loading them.
    torch.utils.flop_counter counts convolutions, matmuls and attention; elementwise ops are not counted.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from train.models import DeployWrapper, ModelConfig, build_model

    cfg = ModelConfig.from_dict(model_config)
    net = DeployWrapper(build_model(taxonomy, cfg, pretrained=False).eval()).eval()
    x = torch.zeros(1, cfg.image_size, cfg.image_size, 3, dtype=torch.uint8)
    # grad mode on (no no_grad / inference_mode): FlopCounterMode's module tracker hooks autograd
    with FlopCounterMode(display=False) as fc:
        net(x)
    return int(fc.get_total_flops() // 2)


def roofline(rows: list[Row], taxonomy, machine: dict[str, Any]) -> dict[str, Any]:
    """MACs per model config and, per measured row, achieved MACs/s over this core's peak."""
    macs_by_cfg: dict[str, int] = {}
    peak = machine["peak"]["per_core_macs_per_s"]
    threads = machine["threads"]
    out = {"peak": machine["peak"], "models": {}, "rows": {}}
    for r in rows:
        cfg = r.record.get("model_config")
        if not cfg:
            continue
        key = json.dumps(cfg, sort_keys=True)
        if key not in macs_by_cfg:
            macs_by_cfg[key] = count_macs(cfg, taxonomy)
        macs = macs_by_cfg[key]
        out["models"].setdefault(r.entry.group, {"macs": macs, "gmacs": macs / 1e9, "arch": cfg.get("arch"),
                                                 "backbone": cfg.get("backbone"), "image_size": cfg.get("image_size")})
        r.record["macs"] = macs
        if r.record.get("status") != "ok":
            continue
        ms = r.record["latency"]["median_ms"]
        achieved = macs / (ms / 1e3)
        kind = "int8" if r.entry.precision == "int8" else "fp32"
        ceiling = peak[kind] * threads
        floor_ms = macs / ceiling * 1e3
        out["rows"][r.entry.label] = {"achieved_gmacs_per_s": achieved / 1e9, "peak_gmacs_per_s": ceiling / 1e9,
                                      "peak_kind": kind, "ratio_of_peak": achieved / ceiling,
                                      "compute_bound_ms": floor_ms, "x_above_compute_bound": ms / floor_ms}
    return out
