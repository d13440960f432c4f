"""The package rules of ARCHITECTURE.md, read from the import lines of every product module.

Every `import` / `from … import` counts, also the lazy ones inside functions: a rule that only holds
at import time still couples the packages.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("sdk", "train", "quantize", "converters", "demo")
NOT_PRODUCT = ("research", "benchmarks", "tests", "scripts")
# "session" as prose (a training session, session 12) or an issue number; not a runtime's session object
HISTORY = re.compile(r"(?<![\w.])sessions?(?![\w.(\[]|\s*=)|\bissue #?\d+", re.I)
# package -> the project packages it may import (ARCHITECTURE.md)
ALLOWED = {
    "sdk": set(),
    "train": {"sdk"},
    "quantize": {"sdk", "train", "converters"},
    "converters": {"sdk", "train"},
    "demo": {"sdk"},
}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in a file; `from a import b` yields `a.b` as well as `a`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def product_files():
    return [p for pkg in PRODUCT for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_packages_import_only_what_the_architecture_allows():
    bad = []
    for path in product_files():
        pkg = path.relative_to(ROOT).parts[0]
        for line, mod in imports(path):
            top = mod.split(".")[0]
            if top in PRODUCT + NOT_PRODUCT and top != pkg and top not in ALLOWED[pkg]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
            if pkg == "sdk" and top == "torch":
                bad.append(f"{path.relative_to(ROOT)}:{line} imports torch (the SDK must run without it)")
    assert not bad, "\n".join(bad)


def test_no_package_reaches_into_another_packages_private_modules():
    bad = []
    for path in product_files():
        pkg = path.relative_to(ROOT).parts[0]
        for line, mod in imports(path):
            parts = mod.split(".")
            if parts[0] in PRODUCT and parts[0] != pkg and any(p.startswith("_") for p in parts[1:]):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_product_files_stay_small_and_speak_of_the_project_not_its_history():
    long, history = [], []
    for path in product_files():
        text = path.read_text()
        if text.count("\n") > 500:
            long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for i, line in enumerate(text.splitlines(), 1):
            if HISTORY.search(line):
                history.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not long, "\n".join(long)
    assert not history, "\n".join(history)


@pytest.mark.parametrize("line, flagged", [
    ("# measured in session 12", True), ("# fixed for issue 6", True), ("x = 1  # see issue #6", True),
    ("return self.session.run(names, feed)", False), ("session = ort.InferenceSession(path)", False),
])
def test_the_history_check_flags_prose_not_runtime_sessions(line, flagged):
    assert bool(HISTORY.search(line)) == flagged


@pytest.mark.parametrize("text, expected", [
    ("from sdk._manifest import X\n", ["sdk._manifest", "sdk._manifest.X"]),
    ("def f():\n    import quantize.sim as s\n", ["quantize.sim"]),
    ("from . import local\n", []),
])
def test_the_import_reader_sees_lazy_and_private_imports(tmp_path, text, expected):
    f = tmp_path / "m.py"
    f.write_text(text)
    assert [m for _, m in imports(f)] == expected
