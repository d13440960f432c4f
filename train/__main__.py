"""`python -m train {student,evaluate} …` — see `python -m train -h`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from .models import ModelConfig
from .loop import TrainConfig, check_recipe

# The defaults are the reference recipes of configs/ (student.yaml, teacher.yaml, distill.yaml).
STUDENT_DEFAULTS = ModelConfig(global_head=True, dropout=0.3)
STUDENT_TRAIN = {"ema": 0.99, "losses": "ce,global_ce"}
# HSQ-FT teacher: Lite2 at 260 px, three scales (block 6 at stride 8 pooled x2, block 14 at stride 16,
# head at stride 32) fused by self-attention, eigen-image query init, two cross-attention layers per level.
TEACHER_DEFAULTS = ModelConfig(arch="hsq_teacher", backbone="efficientnet_lite2", image_size=260, taps=(6, 14, -1),
                               tap_pool=(2, 1, 1), d_model=256, heads=8, query_layers=2, fusion_layers=1,
                               query_init="eigen", global_head=True)
TEACHER_TRAIN = {"epochs": 10, "losses": "ce,global_ce,cluster", "loss_weights": "cluster=0.1", "holdout_fraction": 0.2}
DISTILL_TRAIN = {**STUDENT_TRAIN, "holdout_fraction": 0.2, "loss_weights": "kd=1"}
# subcommand -> (help, model defaults, train defaults): what --help shows and what a run resolves against
SUBCOMMANDS = {
    "student": ("fine-tune the hierarchical query student on labels", STUDENT_DEFAULTS, STUDENT_TRAIN),
    "teacher": ("train the full HSQ-FT teacher (torchrun-ready: DDP on gloo/nccl)", TEACHER_DEFAULTS, TEACHER_TRAIN),
    "distill": ("distill a teacher into a student (labels + per-level KL)", STUDENT_DEFAULTS, DISTILL_TRAIN),
}


def _add_dataclass_args(p: argparse.ArgumentParser, cls, defaults: dict[str, Any]) -> None:
    """One flag per field; the help shows the subcommand's effective default (`defaults` over the field's)."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        if isinstance(default, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                           metavar="BOOL", help=f"(default {default})")
        elif isinstance(default, tuple):
            p.add_argument(flag, type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                           metavar="I,J", help=f"(default {','.join(map(str, default))})")
        else:
            p.add_argument(flag, type=type(default), default=None, help=f"(default {default})")


def _resolve(cls, args: argparse.Namespace, file_conf: dict[str, Any], base=None):
    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
    return cls.from_dict({**(dataclasses.asdict(base) if base is not None else {}), **file_conf,
                          **{k: v for k, v in flags.items() if v is not None}})


def cmd_train(args: argparse.Namespace) -> int:
    """student / teacher / distill: flags over the config file over the subcommand's defaults."""
    _, base_model, base_train = SUBCOMMANDS[args.cmd]
    conf: dict[str, Any] = {}
    if args.config and args.config.endswith((".yaml", ".yml")):
        import yaml
        conf = yaml.safe_load(Path(args.config).read_text()) or {}
    elif args.config:
        conf = json.loads(Path(args.config).read_text())
    mc = _resolve(ModelConfig, args, conf.get("model", {}), base_model)
    tc = _resolve(TrainConfig, args, {**base_train, **conf.get("train", {})})
    try:
        check_recipe(mc, tc)  # before a distillation loads its teachers
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "distill":
        from .distill import distill
        teachers = args.teacher or conf.get("teacher")
        if not teachers:
            print("error: distill needs a teacher: --teacher DIR (repeatable) or 'teacher:' in --config", file=sys.stderr)
            return 2
        temperature = args.temperature if args.temperature is not None else float(conf.get("temperature", 4.0))
        distill([teachers] if isinstance(teachers, str) else teachers, mc, tc, args.out, temperature=temperature,
                resume=args.resume)
    else:
        from .loop import train_model
        train_model(mc, tc, args.out, resume=args.resume)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Metrics of a model directory or an exported artifact (through the SDK) on a split."""
    from sdk import Classifier, Manifest, batch_logprobs
    from sdk.datasets import restrict_to_list

    from .checkpoint import load_model
    from .data import load_dataset
    from .loop import predict_logprobs
    from .metrics import compute_metrics
    model = Path(args.model)
    artifact = (model / "manifest.json").is_file() or model.name == "manifest.json"
    try:
        if artifact:
            tax = Manifest.load(model).taxonomy
        else:
            net, cfg, tax, _ = load_model(model)
        ds = load_dataset(args.data, args.split, taxonomy=tax)
        if args.list:
            ds = restrict_to_list(ds, args.list)
        if args.limit:
            ds = ds.subset(range(min(args.limit, len(ds))))
        if artifact:
            classifier = Classifier.load(model if model.is_dir() else model.parent)
            lp = batch_logprobs(classifier, [s.source for s in ds.samples])
        else:
            lp = predict_logprobs(net, ds, cfg.image_size)
        m = compute_metrics(tax, lp, ds.labels())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.model} on {args.data}:{args.split} (n={int(m['n'])})")
    for k, v in m.items():
        print(f"  {k:24s} {v:.4f}" if isinstance(v, float) else f"  {k:24s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(m, indent=1))
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train", description="Train and evaluate hierfg models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, (help_, model_defaults, train_defaults) in SUBCOMMANDS.items():
        st = sub.add_parser(name, help=help_)
        if name == "distill":
            st.add_argument("--teacher", action="append",
                            help="teacher model directory; repeat for an ensemble (probabilities averaged); "
                                 "or 'teacher:' in --config")
            st.add_argument("--temperature", type=float, default=None,
                            help="softening temperature T (default 4, or 'temperature:' in --config)")
        st.add_argument("--out", required=True, help="model directory to write")
        st.add_argument("--config", help="YAML/JSON with 'model' and 'train' sections; flags override it")
        st.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint after a kill")
        _add_dataclass_args(st, ModelConfig, dataclasses.asdict(model_defaults))
        _add_dataclass_args(st, TrainConfig, train_defaults)
    ev = sub.add_parser("evaluate", help="metrics of a checkpoint or exported artifact on a split")
    ev.add_argument("--model", required=True, help="model directory (model.safetensors) or artifact directory (manifest.json)")
    ev.add_argument("--data", required=True, help="dataset root (Grocery Store root, folder tree, or 'synthetic')")
    ev.add_argument("--split", default="val", help="split file name without .txt (train, val, test, …)")
    ev.add_argument("--list", help="only the photos of the split this file names, one path per line "
                                   "(e.g. a run's holdout.txt with --split train)")
    ev.add_argument("--limit", type=int, default=0, help="evaluate only the first N images")
    ev.add_argument("--json", help="also write the metrics to this JSON file")
    args = p.parse_args(argv)
    return cmd_train(args) if args.cmd in SUBCOMMANDS else cmd_evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
