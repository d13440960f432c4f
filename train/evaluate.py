"""Evaluate a PyTorch model directory or an exported artifact (through the SDK) on a dataset split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .data import load_dataset
from .metrics import compute_metrics


def artifact_logprobs(model_dir: str | Path, ds, batch_size: int = 16) -> list[np.ndarray]:
    from sdk import Classifier
    from tqdm.auto import tqdm
    clf = Classifier.load(model_dir)
    outs = []
    for i in tqdm(range(0, len(ds), batch_size), desc="evaluating artifact", leave=False):
        batch = np.stack([clf.preprocess(s.source) for s in ds.samples[i:i + batch_size]])
        outs.append(clf.logprobs(batch))
    return [np.concatenate([o[l] for o in outs]) for l in range(len(outs[0]))]


def evaluate(model: str | Path, data: str, split: str, limit: int = 0) -> dict[str, Any]:
    model = Path(model)
    if (model / "manifest.json").is_file() or model.name == "manifest.json":
        from sdk import Manifest
        tax = Manifest.load(model).taxonomy
        ds = load_dataset(data, split, taxonomy=tax)
        if limit:
            ds = ds.subset(range(min(limit, len(ds))))
        lp = artifact_logprobs(model if model.is_dir() else model.parent, ds)
    else:
        from .checkpoint import load_model
        from .loop import predict_logprobs
        net, cfg, tax, _ = load_model(model)
        ds = load_dataset(data, split, taxonomy=tax)
        if limit:
            ds = ds.subset(range(min(limit, len(ds))))
        lp = predict_logprobs(net, ds, cfg.image_size)
    return compute_metrics(tax, lp, ds.labels())
