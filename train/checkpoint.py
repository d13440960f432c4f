"""Checkpoints: safetensors weights + JSON config + taxonomy.json; never a pickle. Resumable training state
lives in `<out>/checkpoint/`, written at the end of every epoch; optimizer state is read back with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdk import Taxonomy, atomic_write, sha256_file

from .models import ModelConfig, build_model


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def save_model(model: torch.nn.Module, cfg: ModelConfig, taxonomy: Taxonomy, out: str | Path,
               extra: dict[str, Any] | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "model.safetensors", lambda p: save_file(state_dict_for_save(model), str(p)))
    conf = {"model": cfg.to_dict(), **(extra or {})}
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(conf, indent=1)))
    taxonomy.save(out / "taxonomy.json")
    return out / "model.safetensors"


def load_model(path: str | Path, pretrained: bool = False) -> tuple[torch.nn.Module, ModelConfig, Taxonomy, dict]:
    """Rebuild a model from a model directory (or its model.safetensors). Returns eval-mode model."""
    path = Path(path)
    d = path if path.is_dir() else path.parent
    weights = d / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: expected a model directory written by `python -m train`")
    conf = json.loads((d / "config.json").read_text())
    taxonomy = Taxonomy.load(d / "taxonomy.json")
    cfg = ModelConfig.from_dict(conf["model"])
    model = build_model(taxonomy, cfg, pretrained=pretrained)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval(), cfg, taxonomy, conf


def manifest_model_record(path: str | Path, cfg: ModelConfig, conf: dict) -> dict[str, Any]:
    """What every artifact's manifest records about the model directory it was made from."""
    return {"checkpoint_sha256": sha256_file(Path(path) / "model.safetensors"), "config": cfg.to_dict(),
            "metrics_pytorch": conf.get("metrics", {})}


def save_training_state(out: Path, model: torch.nn.Module, optimizer, scheduler, epoch: int,
                        history: list[dict], ema=None) -> None:
    """Write epoch `epoch` into its own folder, then point `latest.json` at it (an atomic rename), then
    drop older folders: a kill at any moment leaves the previous finished epoch resumable."""
    ck = out / "checkpoint"
    folder = ck / f"epoch-{epoch:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state_dict_for_save(model), str(folder / "model.safetensors"))
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(folder / "ema.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state()}, folder / "state.pt")
    atomic_write(ck / "latest.json", lambda p: p.write_text(json.dumps(
        {"epoch": epoch, "folder": folder.name, "history": history}, indent=1)))
    for old in ck.glob("epoch-*"):
        if old.name != folder.name:
            shutil.rmtree(old)


def load_training_state(out: Path, model: torch.nn.Module, optimizer, scheduler,
                        ema=None) -> tuple[int, list[dict]]:
    """Restore the last finished epoch; returns (next epoch, history). (0, []) when nothing saved."""
    ck = out / "checkpoint"
    if not (ck / "latest.json").is_file():
        return 0, []
    prog = json.loads((ck / "latest.json").read_text())
    folder = ck / prog["folder"]
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if ema is not None:
        if not (folder / "ema.safetensors").is_file():
            raise FileNotFoundError(f"{folder} has no ema.safetensors: this run was started without --ema")
        ema.shadow = load_file(str(folder / "ema.safetensors"))
        ema.updates = scheduler.last_epoch  # one EMA update per optimizer/scheduler step
    return prog["epoch"] + 1, prog["history"]
