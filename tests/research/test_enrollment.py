"""research/enrollment.py: the leave-classes-out root and the recipe its base student is trained with."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def reduced(grocery_root, tmp_path_factory):
    from research.enrollment import reduced_root

    out = tmp_path_factory.mktemp("enroll") / "data"
    return out, reduced_root(Path(grocery_root), out)


def test_the_held_out_classes_leave_training_but_every_parent_keeps_a_child(reduced):
    from research.enrollment import HELD_OUT
    from sdk import Taxonomy, load_dataset

    out, pools = reduced
    tax = Taxonomy.from_grocery(out)
    fine = set(tax.names(tax.depth - 1))
    assert not fine & set(HELD_OUT) and len(fine) == 81 - len(HELD_OUT)
    trained = {Path(s.source).resolve() for s in load_dataset(out, "train").samples}
    assert trained and not trained & {Path(s).resolve() for s, _ in pools["eval"]}  # the slice and val judge only
    assert {n for _, n in pools["enroll"]} == set(HELD_OUT) == set(pools["held_out"])  # enrollment photos: held-out classes
    assert not trained & {Path(s).resolve() for s, _ in pools["enroll"]}


def test_a_config_recipe_trains_the_base_student_whole_network_without_a_second_holdout(reduced, monkeypatch, tmp_path):
    import train.loop
    from research.enrollment import train_student

    seen = {}

    def fake_train(mc, tc, out, log=print):
        seen.update(mc=mc, tc=tc)
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text(json.dumps({}))

    monkeypatch.setattr(train.loop, "train_model", fake_train)
    root = reduced[0]
    train_student(root, tmp_path / "whole", epochs=3, config=str(ROOT / "configs/student.yaml"), log=lambda *_: None)
    mc, tc = seen["mc"], seen["tc"]
    assert tc.freeze_blocks == 0 and tc.cache_views == 0 and tc.epochs == 12  # the recipe's, not --epochs
    assert tc.holdout_fraction == 0.0 and tc.data == str(root) and mc.global_head and mc.image_size == 224
    train_student(root, tmp_path / "cached", epochs=3, log=lambda *_: None)
    assert seen["tc"].freeze_blocks == 11 and seen["tc"].epochs == 3
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["enrollment_train_seconds"] >= 0
