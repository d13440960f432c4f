"""Evaluate a PyTorch model directory or an exported artifact (through the SDK) on a dataset split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdk.datasets import restrict_to_list

from .data import load_dataset
from .metrics import compute_metrics


def evaluate(model: str | Path, data: str, split: str, limit: int = 0, listing: str | None = None) -> dict[str, Any]:
    """Metrics of a model directory or an artifact on `split`, optionally only the photos `listing` names
    (e.g. a training run's `holdout.txt` with `split="train"`)."""
    model = Path(model)
    artifact = (model / "manifest.json").is_file() or model.name == "manifest.json"
    if artifact:
        from sdk import Manifest
        tax = Manifest.load(model).taxonomy
    else:
        from .checkpoint import load_model
        net, cfg, tax, _ = load_model(model)
    ds = load_dataset(data, split, taxonomy=tax)
    if listing:
        ds = restrict_to_list(ds, listing)
    if limit:
        ds = ds.subset(range(min(limit, len(ds))))
    if artifact:
        from sdk import Classifier, batch_logprobs
        lp = batch_logprobs(Classifier.load(model if model.is_dir() else model.parent), [s.source for s in ds.samples])
    else:
        from .loop import predict_logprobs
        lp = predict_logprobs(net, ds, cfg.image_size)
    return compute_metrics(tax, lp, ds.labels())
