"""The README is for users: its two commands come first, it stays short, and its SDK snippet works
verbatim on the bundled model (only the photo's path is filled in)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_two_commands_open_the_readme_and_it_stays_short():
    first_screen = README.splitlines()[:12]
    assert "bash scripts/quickstart.sh" in "\n".join(first_screen)
    assert "bash scripts/test.sh" in "\n".join(first_screen)
    assert len(README.splitlines()) <= 300
    assert not re.search(r"\bsession \d+|\bissue \d+", README, re.I)


def test_the_sdk_snippet_runs_on_the_bundled_model(banana_jpg, monkeypatch, capsys):
    block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    assert 'Classifier.load("demo/model")' in block
    monkeypatch.chdir(ROOT)
    exec(block.replace('"photo.jpg"', repr(str(banana_jpg))), {})
    out = capsys.readouterr().out
    assert "Fruit" in out and "Banana" in out


def test_the_bundled_model_enrolls_a_product_as_the_readme_says(grocery_root, tmp_path):
    """`clf.enroll` on `demo/model` (copied: enrollment writes beside the model): the bundled artifact
    carries the embedding output, and the new product is answered under its parent."""
    import shutil

    from sdk import Classifier

    model = shutil.copytree(ROOT / "demo/model", tmp_path / "model")
    clf = Classifier.load(model)
    photos = sorted((grocery_root / "train/Fruit/Apple/Pink-Lady").glob("*.jpg"))
    assert clf.embed(photos[:2]).shape == (2, 1280)
    clf.enroll("Pink-Lady-Organic", "Apple", photos[:5])
    assert (model / "enrolled.json").is_file()
    again = Classifier.load(model)  # enrolled.json is picked up on load
    assert [e.label for e in again.enrolled] == ["Pink-Lady-Organic"]
    assert [p.label for p in again.classify(photos[0]).path][:2] == ["Fruit", "Apple"]
