"""The table of targets and the options each accepts (validated up front), and checkpoint export."""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._common import TARGETS, Artifact, ExportError, ExportSpec, validate_options


def _module(target: str):
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; targets: {', '.join(TARGETS)}")
    return importlib.import_module(TARGETS[target][0])


def export_model(target: str, model: torch.nn.Module, spec: ExportSpec, out_dir: str | Path) -> Artifact:
    """Export a DeployWrapper-wrapped model to one target (`<target module>.export`)."""
    return _module(target).export(model, spec, out_dir)


def parity_images(data: str, split: str, size: int, n: int = 64, taxonomy=None) -> tuple[np.ndarray, str]:
    """Up to n real images of a split, spread over the split, decoded exactly as the SDK decodes them."""
    from sdk import load_dataset, prepare

    ds = load_dataset(data, split, taxonomy=taxonomy)
    idx = np.linspace(0, len(ds) - 1, num=min(n, len(ds))).round().astype(int)
    imgs = np.stack([prepare(ds.samples[i].source, size) for i in idx])
    return imgs, f"{data}:{split} ({len(idx)} images spread over {len(ds)})"


def _prepared(checkpoint: str | Path, data: str | None, split: str, n_parity: int):
    """The checkpoint wrapped for export, and the spec with its parity photos (from `data`, else the dataset
    the checkpoint was trained on) and the manifest's model record."""
    from train.checkpoint import load_model, manifest_model_record
    from train.models import DeployWrapper

    model, cfg, tax, conf = load_model(checkpoint)
    data = data or conf.get("train", {}).get("data")
    if not data:
        raise ExportError("no --data given and the checkpoint does not record its dataset")
    images, source = parity_images(data, split, cfg.image_size, n_parity, taxonomy=tax)
    spec = ExportSpec(image_size=cfg.image_size, images=images, image_source=source,
                      model_info=manifest_model_record(checkpoint, cfg, conf))
    return DeployWrapper(model).eval(), spec


def export_checkpoint(checkpoint: str | Path, target: str, out_dir: str | Path, data: str | None = None,
                      split: str = "val", n_parity: int = 64, options: dict[str, Any] | None = None) -> Artifact:
    """Load a trained model directory and export it to one target with parity on real images."""
    _module(target)
    validate_options(target, options or {})  # a bad option fails before the checkpoint is loaded
    model, spec = _prepared(checkpoint, data, split, n_parity)
    return export_model(target, model, replace(spec, options=options or {}), out_dir)


def export_all(checkpoint: str | Path, out_dir: str | Path, data: str | None = None, split: str = "val",
               n_parity: int = 64) -> dict[str, Artifact]:
    """Export one checkpoint to every target, each into `<out_dir>/<target>/` with its own manifest.

    The checkpoint is loaded and the parity images decoded once. A failing target does not stop the others;
    after all were tried, an ExportError lists every failure (the artifacts that passed are left in place).
    """
    model, spec = _prepared(checkpoint, data, split, n_parity)
    done: dict[str, Artifact] = {}
    failed: dict[str, str] = {}
    for t in TARGETS:
        try:
            done[t] = export_model(t, model, spec, Path(out_dir) / t)
        except ExportError as e:
            failed[t] = str(e)
            print(f"{t}: FAILED: {e}")
        else:
            print(summary_line(done[t]))
    if failed:
        raise ExportError(f"{len(failed)} of {len(TARGETS)} targets failed: "
                          + "; ".join(f"{t}: {msg}" for t, msg in failed.items()))
    return done


def summary_line(art: Artifact) -> str:
    """One line: what was written where, its size and its parity with PyTorch (or why none)."""
    par = art.manifest.metrics.get("parity", {})
    fine = art.manifest.taxonomy.level_names[-1]
    head = f"{art.target}: wrote {art.path} ({art.manifest.size_bytes / 1e6:.2f} MB) + manifest.json; "
    if par.get("measured", True) is False:
        return head + f"parity not measured: {par.get('reason')}"
    worst = max(par.get(f"max_abs_logprob/{n}", float("nan")) for n in art.manifest.taxonomy.level_names)
    return head + (f"fine agreement with PyTorch {par.get(f'agreement/{fine}', float('nan')):.4f}, "
                   f"max |Δ log-prob| {worst:.2e} on {par.get('n_images')} images")
