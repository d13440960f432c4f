"""What the numbers were measured on: the CPU (from /proc/cpuinfo), its SIMD flags and the tool versions."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

from .._common import tool_versions

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


def machine_info(threads: int) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, versions, thread count."""
    cpu = read_cpuinfo()
    versions = {"python": sys.version.split()[0], **tool_versions(*VERSION_PACKAGES, base=(), missing="absent")}
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
            if f in cpu["flags"]]
    return {"cpu": cpu["model"], "vendor": cpu["vendor"], "cores": cpu["cores"], "logical_cpus": cpu["logical_cpus"],
            "mhz": cpu["mhz"], "simd": simd, "os": platform.platform(), "threads": threads, "versions": versions}


def machine_line(info: dict[str, Any]) -> str:
    v = info["versions"]
    return (f"machine: {info['cpu']} ({info['vendor']}), {info['cores']} cores @ {info['mhz'] / 1000:.2f} GHz, "
            f"SIMD {'+'.join(info['simd']) or 'none'}; python {v['python']}, torch {v['torch']}, "
            f"onnxruntime {v['onnxruntime']}, ai-edge-litert {v['ai-edge-litert']}, executorch {v['executorch']}; "
            f"threads={info['threads']}")
