"""`manifest.json`, the pretrained config that travels beside every exported artifact."""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._errors import ModelIntegrityError, ModelNotFoundError, TaxonomyError
from ._files import atomic_write, sha256_file, size_bytes
from ._taxonomy import Taxonomy

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class InputSpec:
    size: int
    name: str = "image"
    layout: str = "NHWC"
    dtype: str = "uint8"
    color: str = "RGB"
    resize: str = "center-crop long side to aspect <= 4:3, then bilinear resize to size x size"
    normalization: str = "inside the graph: (x - 127) / 128"


def _check_embedding(value: Any, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    ok = isinstance(value, dict) and isinstance(value.get("name"), str) and value["name"] \
        and isinstance(value.get("dim"), int) and not isinstance(value.get("dim"), bool) and value["dim"] > 0
    if not ok:
        raise ModelIntegrityError(f"{where}: manifest 'embedding' must be an object with a name and a positive "
                                  f"integer dim; got {value!r}")
    return dict(value)


@dataclass
class Manifest:
    target: str
    precision: str
    file: str
    sha256: str
    size_bytes: int
    input: InputSpec
    outputs: list[str]
    taxonomy: Taxonomy
    metrics: dict[str, Any] = field(default_factory=dict)
    decoding: dict[str, Any] = field(default_factory=dict)
    tool_versions: dict[str, str] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    # the artifact's extra output after the levels: {"name", "dim", "normalized": "l2", "feature"}; None for
    # artifacts exported before it existed (they still load and classify; enrollment asks to re-export)
    embedding: dict[str, Any] | None = None
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "target": self.target, "precision": self.precision,
                "file": self.file, "sha256": self.sha256, "size_bytes": self.size_bytes, "input": asdict(self.input),
                "outputs": list(self.outputs), "taxonomy_hash": self.taxonomy.hash,
                "taxonomy": self.taxonomy.to_dict(), "metrics": self.metrics, "decoding": self.decoding,
                "tool_versions": self.tool_versions, "model": self.model,
                **({"embedding": self.embedding} if self.embedding is not None else {}), "created": self.created}

    @property
    def graph_outputs(self) -> list[str]:
        """Every output of the artifact in order: the levels, then the embedding when it has one."""
        return [*self.outputs, *([self.embedding["name"]] if self.embedding else [])]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False)

    def save(self, directory: str | os.PathLike) -> Path:
        return atomic_write(Path(directory) / MANIFEST_NAME, self.to_json())

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> "Manifest":
        try:
            if d.get("format_version") != FORMAT_VERSION:
                raise ModelIntegrityError(
                    f"{where}: manifest format_version {d.get('format_version')!r} is not {FORMAT_VERSION}; "
                    "re-export the model with this hierfg version")
            tax = Taxonomy.from_dict(d["taxonomy"])
            if d.get("taxonomy_hash") != tax.hash:
                raise ModelIntegrityError(
                    f"{where}: taxonomy hash mismatch (manifest says {str(d.get('taxonomy_hash'))[:12]}…, "
                    f"the taxonomy in it hashes to {tax.hash[:12]}…)")
            if len(d["outputs"]) != tax.depth:
                raise ModelIntegrityError(f"{where}: {len(d['outputs'])} output names for a {tax.depth}-level taxonomy")
            return cls(target=d["target"], precision=d["precision"], file=d["file"], sha256=d["sha256"],
                       size_bytes=int(d["size_bytes"]), input=InputSpec(**d["input"]), outputs=list(d["outputs"]),
                       taxonomy=tax, metrics=d.get("metrics", {}), decoding=d.get("decoding", {}),
                       tool_versions=d.get("tool_versions", {}), model=d.get("model", {}), created=d.get("created", ""),
                       format_version=d["format_version"], embedding=_check_embedding(d.get("embedding"), where))
        except TaxonomyError as e:
            raise ModelIntegrityError(f"{where}: invalid taxonomy: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ModelIntegrityError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        """Read `manifest.json` (or the manifest inside a model directory)."""
        path = Path(path)
        if not path.exists():
            raise ModelNotFoundError(
                f"{path}: model path does not exist; pass a model directory (artifact + manifest.json): "
                "the repository bundles one in demo/model, and `python -m converters` or `python -m quantize` "
                "export one from a checkpoint")
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise ModelIntegrityError(f"{path}: manifest not found; a model directory holds manifest.json "
                                      "beside the artifact (export with `python -m converters`)")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelIntegrityError(f"{path}: manifest is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ModelIntegrityError(f"{path}: manifest must be a JSON object")
        return cls.from_dict(d, where=str(path))

    def artifact_path(self, directory: str | os.PathLike) -> Path:
        name = Path(self.file)
        if name.is_absolute() or ".." in name.parts:
            raise ModelIntegrityError(f"manifest names artifact {self.file!r} outside its directory")
        return Path(directory) / name

    def verify(self, directory: str | os.PathLike) -> Path:
        """Check the artifact exists and matches size and sha256 — before any runtime parses it."""
        path = self.artifact_path(directory)
        if not path.exists():
            raise ModelIntegrityError(f"{path}: artifact named in the manifest is missing")
        actual_size = size_bytes(path)
        if actual_size != self.size_bytes:
            raise ModelIntegrityError(
                f"{path}: size {actual_size} bytes, manifest says {self.size_bytes} (truncated or replaced?)")
        digest = sha256_file(path)
        if digest != self.sha256:
            raise ModelIntegrityError(
                f"{path}: sha256 {digest[:12]}… does not match the manifest's {self.sha256[:12]}…; "
                "the file was changed after export — re-export or restore it")
        return path
