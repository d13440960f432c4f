"""How a study hands over its results: the table on stdout, the records as JSON (and markdown) on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def print_table(lines: list[str], record: dict[str, Any], json_path: str | None) -> int:
    """Print a markdown table, write `record` to `json_path` (if given); the exit code of a finished study."""
    print("\n".join(lines))
    if json_path:
        Path(json_path).write_text(json.dumps(record, indent=1))
    return 0


def write_results(out: Path, stem: str, record: dict[str, Any], md: str) -> int:
    """`<out>/<stem>.json` and `<out>/<stem>.md`, the markdown also on stdout."""
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    (out / f"{stem}.md").write_text(md)
    print(md, end="")
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0
