"""docs/sdk.md: every ```python block runs, in order, in one namespace, against the real fixture model."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "sdk.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_doc_has_examples():
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 6
    assert any("classify_batch" in b for b in blocks) and any("allow=" in b for b in blocks)


def test_doc_examples_run(onnx_artifact_dir, banana_jpg, grocery_root, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(onnx_artifact_dir, model)
    ns = {"MODEL_DIR": model, "IMAGE": banana_jpg, "DATA": grocery_root}
    for i, block in enumerate(python_blocks(DOC.read_text(encoding="utf-8"))):
        try:
            exec(compile(block, f"{DOC.name}[block {i}]", "exec"), ns)
        except Exception as e:
            raise AssertionError(f"docs/sdk.md python block {i} failed: {type(e).__name__}: {e}\n{block}") from e
