"""The labels and preprocessing every artifact carries inside itself (beside manifest.json).

ONNX writes these into `metadata_props`, Core ML into `user_defined_metadata`: string keys, string
(JSON) values, so a file that lost its manifest still says what its outputs mean and what it expects.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from sdk import InputSpec, Taxonomy
from sdk._manifest import FORMAT_VERSION

from ._common import ExportSpec, output_names


def embedded_metadata(taxonomy: Taxonomy, spec: ExportSpec, input_spec: InputSpec | None = None) -> dict[str, str]:
    """String key -> string value metadata: taxonomy, input/preprocessing spec, output names, precision."""
    inp = input_spec or InputSpec(size=spec.image_size)
    return {
        "hierfg.format_version": str(FORMAT_VERSION),
        "hierfg.taxonomy": json.dumps(taxonomy.to_dict(), ensure_ascii=False),
        "hierfg.taxonomy_hash": taxonomy.hash,
        "hierfg.input_size": str(spec.image_size),
        "hierfg.preprocessing": json.dumps(asdict(inp)),
        "hierfg.outputs": json.dumps(output_names(taxonomy)),
        "hierfg.precision": spec.precision,
    }
