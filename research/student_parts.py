"""What each read-out of a query student contributes: the deployed output, the pooled-feature read-out
alone (`global_head`), and the query heads + CAMP alone (the deployed logits minus the pooled ones).

    python research/student_parts.py runs/student-gce --data $G --split val

For each part: the decoded path's per-level top-1 (the SDK's tree decoder, `train.metrics`), each
level's own argmax top-1, and mistake severity. Images are decoded at the device's exact input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.checkpoint import load_model  # noqa: E402
from train.data import load_dataset  # noqa: E402
from train.loop import predict_logprobs  # noqa: E402
from train.metrics import compute_metrics  # noqa: E402

KEYS = ("top1/coarse", "top1/fine", "argmax_top1/coarse", "argmax_top1/fine", "mistake_severity")


PARTS = ("deployed", "pooled read-out", "queries + CAMP")


class _Parts(torch.nn.Module):
    """`forward_from` returns the three parts' per-level log-probs as one flat list, so one pass of
    `train.loop.predict_logprobs` (the training loop's own evaluation) yields all of them."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward_from(self, x, start=0, cached=None):
        aux: dict = {}
        lps = self.model.forward_from(x, start, cached=cached, aux=aux)
        pooled = [F.log_softmax(g, -1) for g in aux["global_logits"]]
        queries = [F.log_softmax(l - g, -1) for l, g in zip(aux["logits"], aux["global_logits"])]
        return [*lps, *pooled, *queries]


def part_logprobs(model_dir: str, data: str, split: str = "val", batch: int = 32, limit: int = 0):
    """(taxonomy, dataset, {part: per-level log-probs}) for the three parts on a split."""
    model, cfg, tax, _ = load_model(model_dir)
    if not getattr(cfg, "global_head", False):
        raise SystemExit(f"{model_dir}: no global_head, nothing to split")
    ds = load_dataset(data, split, taxonomy=tax)
    if limit:
        ds = ds.subset(range(min(limit, len(ds))))
    with torch.no_grad():
        flat = predict_logprobs(_Parts(model), ds, cfg.image_size, batch_size=batch, progress=False)
    d = tax.depth
    return tax, ds, {name: flat[i * d:(i + 1) * d] for i, name in enumerate(PARTS)}


def parts(model_dir: str, data: str, split: str = "val", batch: int = 32, limit: int = 0) -> dict[str, dict[str, float]]:
    tax, ds, lps = part_logprobs(model_dir, data, split, batch, limit)
    res = {}
    for name, lp in lps.items():
        m = compute_metrics(tax, lp, ds.labels())
        res[name] = {k: float(m[k]) for k in KEYS}
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model directory written by `python -m train student`")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = parts(a.model, a.data, a.split)
    print(f"{'part':18s} " + " ".join(f"{k:>20s}" for k in KEYS))
    for name, m in res.items():
        print(f"{name:18s} " + " ".join(f"{m[k]:20.3f}" for k in KEYS))


if __name__ == "__main__":
    main()
