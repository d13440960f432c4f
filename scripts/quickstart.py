"""The README's first command: train a tiny student on the embedded synthetic data, export it to
ONNX with a parity check, and classify a sample through the SDK — the whole pipeline in minutes.

It chains the stages (train → converters → sdk), so it lives outside the packages."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/quickstart.py")
    p.add_argument("--out", default="runs/quickstart", help="where the model and the ONNX artifact go")
    p.add_argument("--epochs", type=int, default=6)
    a = p.parse_args(argv)
    import numpy as np

    from converters import export_checkpoint
    from sdk import Classifier

    from sdk.datasets import synthetic_dataset
    from train.loop import TrainConfig, train_model
    from train.models import ModelConfig

    t0 = time.time()
    out = Path(a.out)
    mc = ModelConfig(image_size=96, d_model=64, heads=2)
    tc = TrainConfig(data="synthetic", epochs=a.epochs, batch_size=32, lr=3e-3, cache_views=2, freeze_blocks=11)
    metrics = train_model(mc, tc, out / "model")
    art = export_checkpoint(out / "model", "onnx", out / "onnx", data="synthetic", split="val", n_parity=48)
    clf = Classifier.load(out / "onnx")
    sample = synthetic_dataset("test").samples[5]
    pred = clf.classify(np.asarray(sample.source))
    truth = " › ".join(clf.taxonomy.path(clf.taxonomy.depth - 1, sample.labels[-1]))
    print(f"\nval: {', '.join(f'{k}={v:.3f}' for k, v in metrics['val'].items() if k.startswith('top1/'))}")
    print(f"ONNX artifact: {art.path} (fine agreement with PyTorch "
          f"{art.manifest.metrics['parity']['agreement/fine']:.3f})")
    print(f"sample image (truth: {truth}) -> {pred.breadcrumb()}  "
          f"[{', '.join(f'{p.probability:.2f}' for p in pred.path)}]")
    print(f"done in {time.time() - t0:.0f}s")
    print("\nNext:\n"
          "  .venv/bin/python -m sdk classify YOUR_PHOTO.jpg --model demo/model   # the bundled grocery model\n"
          "  .venv/bin/python -m demo --model demo/model                          # the warehouse scanner app\n"
          "  README.md › 'Train on your own photos' for the full pipeline on the Grocery Store dataset")
    return 0


if __name__ == "__main__":
    sys.exit(main())
