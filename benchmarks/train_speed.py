"""Training-step throughput: the query student (Lite0 @ 224) and the teacher (Lite2 @ 260), whole
network trained, in NCHW fp32, channels_last fp32 and channels_last + bf16 autocast (depthwise convs kept
fp32, as `train` runs it, and, for comparison, in bf16 too).

    python benchmarks/train_speed.py [--models student,teacher] [--steps 4] [--batch 32] [--compile]
                                     [--json runs/train_speed.json]

Each mode times `--steps` full optimizer steps (forward, loss, backward, AdamW) after one warm-up
step, on random uint8 photos (speed does not depend on the content), and prints img/s, seconds per
step and the implied epoch time for the 2,640 training photos of Grocery Store, with the CPU's flags.
`--compile` adds channels_last + bf16 under `torch.compile` and reports its compile time separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.__main__ import STUDENT_DEFAULTS, TEACHER_DEFAULTS  # noqa: E402
from train.backbones import SameConv  # noqa: E402
from train.data import synthetic_taxonomy  # noqa: E402
from train.loop import autocast, cpu_flags, to_input  # noqa: E402
from train.losses import LossContext, get_loss  # noqa: E402
from train.models import build_model  # noqa: E402
from dataclasses import replace  # noqa: E402

MODELS = {"student": replace(STUDENT_DEFAULTS, image_size=224), "teacher": replace(TEACHER_DEFAULTS, image_size=260)}
# (channels_last, precision, depthwise convs in bf16 too): the last mode is autocast without the backbone's
# fp32 depthwise convs (train/backbones.py SameConv), to show what keeping them fp32 is worth on this CPU
MODES = {"nchw-fp32": (False, "fp32", False), "channels_last-fp32": (True, "fp32", False),
         "channels_last-bf16": (True, "bf16", False), "channels_last-bf16-dwbf16": (True, "bf16", True)}
EPOCH_PHOTOS = 2640


def time_steps(name: str, mode: str, steps: int, batch: int, compile_: bool = False) -> dict:
    channels_last, precision, bf16_depthwise = MODES[mode]
    torch.manual_seed(0)
    cfg = MODELS[name]
    tax = synthetic_taxonomy()
    model = build_model(tax, cfg, pretrained=True).train()
    if bf16_depthwise:  # this model's instances only: plain autocast everywhere
        for conv in model.modules():
            if isinstance(conv, SameConv) and conv.groups > 1:
                conv._conv_forward = conv._same_conv
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ce = get_loss("ce")
    imgs = torch.randint(0, 256, (batch, 3, cfg.image_size, cfg.image_size)).float()
    y = torch.randint(0, 2, (batch, tax.depth))
    cpu = torch.device("cpu")
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with autocast(cpu, precision):
            lps = [lp.float() for lp in net(to_input(imgs, cpu, channels_last))]
            loss = ce(LossContext(model, lps, y, {}, tax))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[1:])
    return {"model": name, "backbone": cfg.backbone, "image_size": cfg.image_size, "mode": mode + ("+compile" if compile_ else ""),
            "batch": batch, "seconds_per_step": step, "images_per_second": batch / step,
            "epoch_minutes": EPOCH_PHOTOS / (batch / step) / 60, "first_step_seconds": times[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="student,teacher")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="also time channels_last-bf16 under torch.compile")
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    models = [m for m in a.models.split(",") if m]
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in models if m not in MODELS] + [m for m in modes if m not in MODES]
    if bad or a.steps < 1 or a.batch < 1:
        print(f"error: unknown {bad} (models: {list(MODELS)}, modes: {list(MODES)}) or steps/batch < 1", file=sys.stderr)
        return 2
    flags = sorted(cpu_flags())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU flags: {','.join(flags) or 'none'}")
    rows = []
    runs = [(m, mode, False) for m in models for mode in modes] + [(m, "channels_last-bf16", True) for m in models if a.compile]
    for m, mode, comp in runs:
        r = time_steps(m, mode, a.steps, a.batch, comp)
        rows.append(r)
        print(f"{r['model']:8s} {r['backbone']:18s} {r['image_size']}px {r['mode']:28s} {r['seconds_per_step']:6.2f} s/step "
              f"{r['images_per_second']:6.1f} img/s  epoch of {EPOCH_PHOTOS}: {r['epoch_minutes']:5.1f} min "
              f"(first step {r['first_step_seconds']:.1f} s)", flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"cpu_flags": flags, "threads": torch.get_num_threads(),
                                            "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
