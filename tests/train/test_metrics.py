import numpy as np

from sdk import Node, Taxonomy, lca_height
from train.metrics import compute_metrics, consistency_rate, hierarchical_prf


def tax():
    return Taxonomy(["cat", "coarse", "fine"], [
        [Node("F", None), Node("V", None)],
        [Node("Apple", 0), Node("Pear", 0), Node("Leek", 1)],
        [Node("Gala", 0), Node("Pink", 0), Node("Conf", 1), Node("Leek", 2)]])


def test_lca_height():
    true = np.array([[0, 0, 0]] * 3)
    pred = np.array([[0, 0, 1], [0, 1, 2], [1, 2, 3]])
    assert lca_height(pred, true).tolist() == [1, 2, 3]


def test_consistency_rate():
    t = tax()
    assert consistency_rate(t, np.array([[0, 0, 1], [1, 0, 1]])) == 0.5


def test_hierarchical_prf_with_backoff():
    hp, hr, hf = hierarchical_prf([[0, 0]], np.array([[0, 0, 1]]))
    assert hp == 1.0 and abs(hr - 2 / 3) < 1e-9


def test_compute_metrics_perfect_and_coarse_only_labels():
    t = tax()
    labels = np.array([[0, 0, 0], [1, 2, 3], [0, 1, -1]])
    said = np.array([[0, 0, 0], [1, 2, 3], [0, 1, 2]])  # what the model outputs; row 3 is fine-unlabelled
    eye = [np.log(np.eye(n)[said[:, l]] * 0.98 + 0.02 / n) for l, n in enumerate(t.sizes)]
    m = compute_metrics(t, eye, labels)
    assert m["top1/fine"] == 1.0 and m["top1/coarse"] == 1.0 and m["full_path"] == 1.0
    assert m["mistake_severity"] == 0.0 and m["consistency"] == 1.0
