"""What every converter shares: the export spec, the artifact record, manifest and embedded metadata,
running a model in batches, and parity: the artifact is loaded through the SDK (hash-checked like on a
device), run on real photos and compared with PyTorch on the same uint8 batch; below threshold export fails.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sdk import (FORMAT_VERSION, Classifier, InputSpec, Manifest, Taxonomy, TreeDecoder, concat_levels, sha256_file,
                 size_bytes)


# target -> (module, options it accepts with their defaults); validated up front (`validate_options`)
TARGETS: dict[str, tuple[str, dict[str, Any]]] = {
    "onnx": ("converters.onnx", {"opset": 17, "dynamic_batch": True}),
    "tflite": ("converters.tflite", {"batch": 1}),
    "executorch": ("converters.executorch", {"batch": 1}),
    "coreml": ("converters.coreml", {"batch": 1, "minimum_deployment_target": "iOS16"}),
}


class ExportError(RuntimeError):
    """An export could not produce a valid artifact (conversion failed or parity below threshold)."""


class ParityError(ExportError):
    """The exported artifact disagrees with PyTorch on real images beyond the threshold."""


@dataclass(frozen=True)
class ExportSpec:
    """What to export and how to check it. `images` are uint8 (N, S, S, 3) real photos for parity."""

    image_size: int
    precision: str = "fp32"
    images: np.ndarray | None = None
    image_source: str = ""  # where the parity images came from (recorded in the manifest)
    min_agreement: float = 0.995  # fine-level top-1 agreement with PyTorch required to pass
    max_abs_logprob: float | None = 1e-3  # fp32 only: max |Δ log-prob| allowed (None: not checked)
    # photos whose reference fine top-2 gap is below this many nats are near-ties that a lossy artifact
    # (int8) may flip without being broken: the agreement gate counts the other photos (0: every photo)
    tie_margin: float = 0.0
    # smallest cosine allowed between the artifact's embedding and PyTorch's on the parity images (None:
    # recorded, not judged); fp32 keeps the direction, so enrolled prototypes stay valid across formats
    min_embedding_cosine: float | None = 0.99
    options: dict[str, Any] = field(default_factory=dict)
    model_info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Artifact:
    target: str
    path: Path
    manifest: Manifest


def tool_versions(*packages: str, base=("hierfg", "torch", "numpy"), missing: str | None = None) -> dict[str, str]:
    """Installed versions of `base` + `packages`; one not installed is left out (or recorded as `missing`)."""
    out = {}
    for p in (*base, *packages):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            if missing is not None:
                out[p] = missing
    return out


EMBEDDING_OUTPUT = "embedding"


def output_names(taxonomy: Taxonomy) -> list[str]:
    """The per-level log-prob outputs (the manifest's `outputs`), coarsest first."""
    return [f"logp_{name}" for name in taxonomy.level_names]


def graph_output_names(model: torch.nn.Module) -> list[str]:
    """Every output of an exported graph in order: the levels, then the embedding when the model has one."""
    return output_names(model.model.taxonomy) + ([EMBEDDING_OUTPUT] if embedding_record(model) else [])


def embedding_record(model: torch.nn.Module) -> dict[str, Any] | None:
    """The manifest's `embedding` entry for a DeployWrapper (None when it exports no embedding)."""
    dim = getattr(model, "embedding_dim", None)
    if not dim:
        return None
    return {"name": EMBEDDING_OUTPUT, "dim": int(dim), "normalized": "l2", "feature": model.embedding_feature}


def embedded_metadata(taxonomy: Taxonomy, spec: ExportSpec, input_spec: InputSpec | None = None,
                      embedding: dict[str, Any] | None = None) -> dict[str, str]:
    """What every artifact carries inside itself beside manifest.json (ONNX `metadata_props`, Core ML
    `user_defined_metadata`, a TFLite metadata entry), so a file that lost its manifest still says what
    its outputs mean and what it expects: string keys, string (JSON) values."""
    inp = input_spec or InputSpec(size=spec.image_size)
    return {
        "hierfg.format_version": str(FORMAT_VERSION),
        "hierfg.taxonomy": json.dumps(taxonomy.to_dict(), ensure_ascii=False),
        "hierfg.taxonomy_hash": taxonomy.hash,
        "hierfg.input_size": str(spec.image_size),
        "hierfg.preprocessing": json.dumps(asdict(inp)),
        "hierfg.outputs": json.dumps(output_names(taxonomy)),
        "hierfg.precision": spec.precision,
        **({"hierfg.embedding": json.dumps(embedding)} if embedding else {}),
    }


def run_batched(run: Callable[[np.ndarray], Any], images: np.ndarray, batch: int) -> list[np.ndarray]:
    """`run` on consecutive batches of `images` (contiguous slices), its per-level outputs concatenated per level."""
    return concat_levels([list(run(np.ascontiguousarray(images[i:i + batch]))) for i in range(0, len(images), batch)])


@torch.inference_mode()
def torch_outputs(deploy: torch.nn.Module, images: np.ndarray, batch: int = 16,
                  ) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Per-level log-probs (float64) of a DeployWrapper on uint8 NHWC images, and its embeddings
    (float32, None when the wrapper exports none)."""
    out = run_batched(lambda x: [o.numpy() for o in deploy(torch.from_numpy(x))], images, batch)
    depth = deploy.model.taxonomy.depth
    return [a.astype(np.float64) for a in out[:depth]], (out[depth] if len(out) > depth else None)


def torch_logprobs(deploy: torch.nn.Module, images: np.ndarray, batch: int = 16) -> list[np.ndarray]:
    """Per-level log-probs (float64) of a DeployWrapper on uint8 NHWC images."""
    return torch_outputs(deploy, images, batch)[0]


def embedding_parity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Cosine between the artifact's and PyTorch's embedding of each photo: min and mean."""
    ref = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    cand = candidate / np.maximum(np.linalg.norm(candidate, axis=1, keepdims=True), 1e-12)
    cos = (ref.astype(np.float64) * cand).sum(1)
    return {"embedding_cosine_min": float(cos.min()), "embedding_cosine_mean": float(cos.mean())}


def parity(reference: list[np.ndarray], candidate: list[np.ndarray], taxonomy: Taxonomy,
           tie_margin: float = 0.0) -> dict[str, Any]:
    """Top-1 agreement per level and the largest |Δ log-prob|; with `tie_margin`, also the fine agreement
    on the photos the reference decides by at least that many nats (`agreement_decided/<fine>`)."""
    dec = TreeDecoder(taxonomy)
    pr, pc = dec.paths(reference), dec.paths(candidate)
    rec: dict[str, Any] = {"n_images": int(len(pr))}
    for lvl, name in enumerate(taxonomy.level_names):
        rec[f"agreement/{name}"] = float((pr[:, lvl] == pc[:, lvl]).mean())
        rec[f"max_abs_logprob/{name}"] = float(np.max(np.abs(np.clip(reference[lvl], -80, 0) - np.clip(candidate[lvl], -80, 0))))
    rec["agreement/path"] = float((pr == pc).all(1).mean())
    if tie_margin > 0:
        fine = taxonomy.level_names[-1]
        top2 = np.sort(reference[-1], axis=1)[:, -2:]
        decided = (top2[:, 1] - top2[:, 0]) >= tie_margin
        rec["tie_margin"] = tie_margin
        rec["near_ties"] = int((~decided).sum())
        same = pr[:, -1] == pc[:, -1]
        rec[f"agreement_decided/{fine}"] = float(same[decided].mean()) if decided.any() else 1.0
    return rec


def agreement_passes(rec: dict[str, Any], fine: str, min_agreement: float, tie_margin: float = 0.0) -> bool:
    """The parity floor on a `parity` record. Exact (fp32): fine agreement >= `min_agreement`. Lossy
    (`tie_margin` > 0): on the decided photos, at most the floor's share of them, rounded up, may flip
    (1 of 8 decided photos, 2 of 24), so a handful of decided photos cannot fail a sound artifact alone."""
    if tie_margin <= 0:
        return rec[f"agreement/{fine}"] >= min_agreement
    n = rec["n_images"] - rec["near_ties"]
    flipped = round((1 - rec[f"agreement_decided/{fine}"]) * n)
    return flipped <= math.ceil((1 - min_agreement) * n - 1e-9)


def check_parity(target: str, deploy: torch.nn.Module, artifact: Path, manifest: Manifest,
                 spec: ExportSpec) -> Manifest:
    """Run the artifact through the SDK on spec.images, record parity in the manifest, raise below threshold."""
    if spec.images is None or len(spec.images) == 0:
        raise ExportError("parity needs real images: pass ExportSpec(images=...) (see converters.parity_images)")
    clf = Classifier.load(artifact.parent)
    ref, ref_emb = torch_outputs(deploy, spec.images)
    rec = parity(ref, clf.logprobs(spec.images), manifest.taxonomy, spec.tie_margin)
    if manifest.embedding is not None and ref_emb is not None:
        rec.update(embedding_parity(ref_emb, clf.embeddings(spec.images)))
    rec["images"] = spec.image_source
    rec["reference"] = "pytorch fp32"
    manifest.metrics["parity"] = rec
    manifest.save(artifact.parent)
    fine = manifest.taxonomy.level_names[-1]
    key = f"agreement_decided/{fine}" if spec.tie_margin > 0 else f"agreement/{fine}"
    if not agreement_passes(rec, fine, spec.min_agreement, spec.tie_margin):
        judged = (f"{rec['n_images'] - rec['near_ties']} of {rec['n_images']} images (the rest are near-ties under "
                  f"{spec.tie_margin} nats)" if spec.tie_margin > 0 else f"{rec['n_images']} images")
        raise ParityError(f"{target}: fine top-1 agreement with PyTorch {rec[key]:.4f} is below "
                          f"{spec.min_agreement} on {judged}; artifact left at {artifact} for inspection")
    if spec.max_abs_logprob is not None:
        worst = max(rec[f"max_abs_logprob/{n}"] for n in manifest.taxonomy.level_names)
        if worst > spec.max_abs_logprob:
            raise ParityError(f"{target}: max |Δ log-prob| {worst:.2e} exceeds {spec.max_abs_logprob:.0e}")
    if spec.min_embedding_cosine is not None and rec.get("embedding_cosine_min", 1.0) < spec.min_embedding_cosine:
        raise ParityError(f"{target}: embedding cosine with PyTorch {rec['embedding_cosine_min']:.4f} is below "
                          f"{spec.min_embedding_cosine} on {rec['n_images']} images")
    return manifest


def finish_export(target: str, model: torch.nn.Module, path: Path, spec: ExportSpec, versions: dict[str, str],
                  metrics: dict[str, Any] | None = None, no_parity: str | None = None) -> Artifact:
    """The manifest beside a written artifact (with its `metrics`: the `export` record, int8's
    `quantization`), then parity through the SDK on `spec.images`, unless `no_parity` says why it cannot
    run here."""
    taxonomy = model.model.taxonomy
    m = Manifest(target=target, precision=spec.precision, file=path.name, sha256=sha256_file(path),
                 size_bytes=size_bytes(path), input=InputSpec(size=spec.image_size), outputs=output_names(taxonomy),
                 taxonomy=taxonomy, metrics=metrics or {}, tool_versions=versions, model=spec.model_info,
                 embedding=embedding_record(model))
    m.save(path.parent)
    if no_parity is None:
        m = check_parity(target, model, path, m, spec)
    else:
        m.metrics["parity"] = {"measured": False, "reason": no_parity, "images": spec.image_source}
        m.save(path.parent)
    return Artifact(target, path, m)


def validate_options(target: str, options: dict[str, Any]) -> dict[str, Any]:
    """The target's default options updated with `options`; ExportError naming any it does not accept."""
    allowed = TARGETS[target][1]
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ExportError(f"target {target!r} does not accept option(s) {bad}; it accepts {sorted(allowed)}")
    return {**allowed, **options}


def begin_export(target: str, model: torch.nn.Module, spec: ExportSpec, out_dir: str | Path,
                 ) -> tuple[Path, dict[str, Any], Taxonomy]:
    """The preamble every converter shares: output folder, resolved options (a `batch` option, where a
    target has one, must be >= 1), the model's taxonomy, and eval mode."""
    opts = validate_options(target, spec.options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "batch" in opts and int(opts["batch"]) < 1:
        raise ExportError(f"{target}: option batch must be >= 1, got {opts['batch']!r}")
    model.eval()
    return out, opts, model.model.taxonomy


def example_images(spec: ExportSpec, batch: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A blank NHWC image batch at the model's fixed size, the example input for tracing/export."""
    return torch.zeros(int(batch), spec.image_size, spec.image_size, 3, dtype=dtype)
