"""`python -m converters profile --model DIR [--model DIR …]` — a per-op table for each artifact
(docs/benchmark.md): op type, node count, ms per inference, share of the run, precision, the slowest nodes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .profile import PRECISION_HELP, Profile, ProfileError, profile_model
from .report import _f


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
    p = argparse.ArgumentParser(prog="python -m converters profile",
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
