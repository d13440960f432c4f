"""Every recipe in configs/ names a model `python -m train` can build, in a fresh interpreter (an
architecture registered by a module nobody imported yet would only fail there)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

BUILD = """
import sys, yaml
from sdk import Taxonomy
from train.models import ModelConfig, build_model
conf = yaml.safe_load(open(sys.argv[1]))
model = build_model(Taxonomy.from_grocery(sys.argv[2]), ModelConfig.from_dict(conf["model"]), pretrained=False)
print(type(model).__name__, conf["model"].get("arch", "hsq_student"))
"""


def test_every_recipe_is_found():
    assert {p.stem for p in CONFIGS} >= {"student", "teacher", "flat", "distill"}


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_the_recipe_builds_its_model_in_a_fresh_interpreter(config, grocery_root):
    r = subprocess.run([sys.executable, "-c", BUILD, str(config), str(grocery_root)], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[1] in ("hsq_student", "hsq_teacher", "flat", "hrn")
