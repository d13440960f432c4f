import numpy as np
import pytest

from sdk import ModelOutputError, Node, Taxonomy, TreeDecoder


@pytest.fixture()
def tree():
    return Taxonomy(["cat", "fine"], [[Node("Fruit", None), Node("Veg", None)],
                                      [Node("Apple", 0), Node("Pear", 0), Node("Leek", 1)]])


def test_marginals_follow_the_architecture_definition(tree):
    lp0 = np.log([[0.3, 0.7]])
    lp1 = np.log([[0.5, 0.2, 0.3]])
    m = TreeDecoder(tree).marginals([lp0, lp1])
    leaf = np.array([0.3 * 0.5, 0.3 * 0.2, 0.7 * 0.3])
    leaf /= leaf.sum()
    np.testing.assert_allclose(m[1][0], leaf)
    np.testing.assert_allclose(m[0][0], [leaf[0] + leaf[1], leaf[2]])


def test_path_is_consistent_and_child_not_above_parent(tree):
    rng = np.random.default_rng(0)
    dec = TreeDecoder(tree)
    for _ in range(200):
        lps = [np.log(rng.dirichlet(np.ones(n), size=4)) for n in tree.sizes]
        marg = dec.marginals(lps)
        for r in range(4):
            path = dec.greedy_path(marg, r)
            assert tree.parent(1, path[1]) == path[0]
            assert marg[1][r, path[1]] <= marg[0][r, path[0]] + 1e-12


def test_an_impossible_argmax_pair_is_never_the_answer(tree):
    # heads disagree: category says Veg, fine head says Apple; the answer must be a legal path
    lps = [np.log([[0.45, 0.55]]), np.log([[0.6, 0.05, 0.35]])]
    path = TreeDecoder(tree).paths(lps)[0]
    assert tree.parent(1, path[1]) == path[0]


def test_nan_output_is_an_error(tree):
    with pytest.raises(ModelOutputError):
        TreeDecoder(tree).marginals([np.array([[np.nan, 0.0]]), np.log([[0.5, 0.2, 0.3]])])
