import os
from pathlib import Path

import numpy as np

from train.data import load_view, read_grocery, relabel_coarse


def test_image_identity_and_crops_do_not_depend_on_how_the_root_is_spelled(grocery_root):
    """Cache keys and seeded crops come from the path relative to the dataset root: the same photos under
    an absolute and a relative spelling of the root train on the same pixels and share caches."""
    a = read_grocery(Path(grocery_root).resolve(), "val")
    b = read_grocery(Path(os.path.relpath(Path(grocery_root).resolve())) / "train" / "..", "val")
    assert a.samples[0].source != b.samples[0].source
    assert [s.key for s in a.samples] == [s.key for s in b.samples]
    assert a.samples[0].key.startswith("val/") and not Path(a.samples[0].key).is_absolute()
    for view in (2, 5):  # random crops + flips, seeded per image
        assert np.array_equal(load_view(a.samples[3], 96, view, 0), load_view(b.samples[3], 96, view, 0))
    # HRN relabelling keeps the identity (only the finest label moves up)
    r = relabel_coarse(a, 1.0)
    assert [s.key for s in r.samples] == [s.key for s in a.samples] and r.samples[0].labels[-1] == -1
