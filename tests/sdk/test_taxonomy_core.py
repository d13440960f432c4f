import json
import subprocess
import sys

import pytest

from sdk import Node, Taxonomy, TaxonomyError


def test_grocery_taxonomy_matches_dataset(grocery_root):
    t = Taxonomy.from_grocery(grocery_root)
    assert t.level_names == ("category", "coarse", "fine")
    assert t.sizes == (3, 43, 81)
    assert t.path(2, t.index(2, "Granny-Smith")) == ["Fruit", "Apple", "Granny-Smith"]
    # a coarse class with one child repeats itself one level down
    assert t.path(2, t.index(2, "Banana")) == ["Fruit", "Banana", "Banana"]
    assert t.children(1, t.index(1, "Apple")) == [0, 1, 2, 3, 4]


def test_save_load_roundtrip_keeps_hash(tmp_path, grocery_root):
    t = Taxonomy.from_grocery(grocery_root)
    t.save(tmp_path / "taxonomy.json")
    u = Taxonomy.load(tmp_path / "taxonomy.json")
    assert u == t and u.hash == t.hash
    d = json.loads((tmp_path / "taxonomy.json").read_text())
    d["levels"][2]["nodes"][0]["name"] = "Tampered"
    (tmp_path / "taxonomy.json").write_text(json.dumps(d))
    with pytest.raises(TaxonomyError, match="hash mismatch"):
        Taxonomy.load(tmp_path / "taxonomy.json")


@pytest.mark.parametrize("levels, match", [
    ([[Node("A", None)], [Node("x", 0), Node("x", 0)]], "duplicate name"),
    ([[Node("A", None)], [Node("x", 3)]], "orphan"),
    ([[Node("A", None), Node("B", None)], [Node("x", 0)]], "no child"),
    ([[Node("A", 0)], [Node("x", 0)]], "parent null"),
])
def test_invalid_trees_raise_typed_error(levels, match):
    with pytest.raises(TaxonomyError, match=match):
        Taxonomy(["l0", "l1"], levels)


def test_folder_tree_builder(tmp_path):
    from PIL import Image
    for p in ["Fruit/Apple/Gala", "Fruit/Apple/Pink", "Veg/Leek/Leek"]:
        (tmp_path / p).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / p / "a.jpg")
    t = Taxonomy.from_folder_tree(tmp_path, ["category", "coarse", "fine"])
    assert t.sizes == (2, 2, 3)
    assert t.path(2, t.index(2, "Pink")) == ["Fruit", "Apple", "Pink"]
    (tmp_path / "Veg/Odd").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "Veg/Odd/b.jpg")
    with pytest.raises(TaxonomyError, match="different depths"):
        Taxonomy.from_folder_tree(tmp_path)


def test_import_sdk_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, sdk; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
