"""Tree-consistent decoding in numpy (ARCHITECTURE.md, "Tree-consistent decoding").

The score of a leaf is the sum over levels of the log-probability of its ancestor at that level; leaf
scores are normalized to a distribution and node marginals are sums of leaf probabilities under each
node. The answer walks down from the root choosing the most probable child of the node chosen above,
so a child's probability never exceeds its parent's, and it stops (backs off) at the deepest level
whose marginal clears that level's threshold.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ._errors import ModelOutputError
from ._taxonomy import Taxonomy


class TreeDecoder:
    """Precomputed index arrays for one taxonomy; every method works on batches."""

    def __init__(self, taxonomy: Taxonomy):
        self.taxonomy = taxonomy
        self.anc = np.asarray(taxonomy.ancestor_matrix(), dtype=np.int64)  # (n_leaves, depth)
        self.sizes = taxonomy.sizes
        # per level, leaves grouped by node for `node_sums`: a row's sums then never depend on the other
        # rows in the batch (a BLAS matmul may change rounding with the batch size)
        self._groups = []
        for lvl, n in enumerate(self.sizes):
            order = np.argsort(self.anc[:, lvl], kind="stable")
            self._groups.append((order, np.searchsorted(self.anc[order, lvl], np.arange(n))))

    def marginals(self, logprobs: Sequence[np.ndarray], leaf_mask: np.ndarray | None = None) -> list[np.ndarray]:
        """Per level, (batch, n_nodes) marginals of the tree-consistent leaf distribution; `ModelOutputError` if any
        row is unusable (`leaf_probs` isolates bad rows instead)."""
        leaf, errors = self.leaf_probs(logprobs, leaf_mask)
        if errors:
            raise next(iter(errors.values()))
        return self.node_sums(leaf)

    def leaf_probs(self, logprobs: Sequence[np.ndarray], leaf_mask: np.ndarray | None = None,
                   ) -> tuple[np.ndarray, dict[int, ModelOutputError]]:
        """(batch, n_leaves) leaf distribution, renormalized over `leaf_mask` if given, and the rows
        that cannot be decoded (NaN / +Inf in any level, or every allowed leaf at probability zero).
        Bad rows hold zeros; the others are unaffected by them. Wrong output counts or shapes fail the
        whole batch."""
        if len(logprobs) != self.taxonomy.depth:
            raise ModelOutputError(f"model returned {len(logprobs)} outputs; taxonomy has {self.taxonomy.depth} levels")
        lps = [np.atleast_2d(np.asarray(lp, dtype=np.float64)) for lp in logprobs]
        for lvl, lp in enumerate(lps):
            if lp.shape != (lps[0].shape[0], self.sizes[lvl]):
                raise ModelOutputError(f"output of level {lvl} has shape {lp.shape}; expected "
                                       f"({lps[0].shape[0]}, {self.sizes[lvl]}): (batch, nodes of the level)")
        errors: dict[int, ModelOutputError] = {}
        score = np.zeros((lps[0].shape[0], self.anc.shape[0]))
        for lvl, lp in enumerate(lps):
            for r in np.flatnonzero(np.isnan(lp).any(axis=1) | np.isposinf(lp).any(axis=1)):
                errors.setdefault(int(r), ModelOutputError(
                    f"model output of level {lvl} ({self.taxonomy.level_names[lvl]!r}) holds NaN or +Inf for "
                    "this image; refusing to label it (check the artifact's parity report or re-export)"))
            score += lp[:, self.anc[:, lvl]]
        if leaf_mask is not None:
            score[:, ~leaf_mask] = -np.inf
        if errors:
            score[list(errors)] = 0.0  # placeholder so the arithmetic below stays finite
        dead = np.isneginf(score).all(axis=1) | np.isnan(score).any(axis=1)
        for r in np.flatnonzero(dead):
            errors.setdefault(int(r), ModelOutputError(
                "every allowed leaf has probability zero for this image; the model output is degenerate"))
            score[r] = 0.0
        score -= score.max(axis=1, keepdims=True)
        p = np.exp(score)
        p /= p.sum(axis=1, keepdims=True)
        if errors:
            p[list(errors)] = 0.0
        return p, errors

    def node_sums(self, leaf: np.ndarray) -> list[np.ndarray]:
        """Per level, (batch, n_nodes) sums of leaf probabilities under each node, row by row."""
        # clip float round-off (1.0000000000000002) so probabilities stay in [0, 1]; order is kept
        return [np.minimum(np.add.reduceat(leaf[:, order], starts, axis=1), 1.0) for order, starts in self._groups]

    def leaf_mask(self, allow: Iterable[str] | None = None, deny: Iterable[str] | None = None) -> np.ndarray | None:
        """Boolean mask over leaves: under any node named in `allow` (all leaves if None) and under no node
        named in `deny`. A name is a node name (shallowest match) or `level:name`, e.g. `fine:Banana`."""
        if allow is None and deny is None:
            return None
        n = self.anc.shape[0]

        def under(names: Iterable[str]) -> np.ndarray:
            hit = np.zeros(n, bool)
            for name in names:
                lvl, idx = self.taxonomy.find(name)
                hit |= self.anc[:, lvl] == idx
            return hit

        if isinstance(allow, str) or isinstance(deny, str):
            raise TypeError("allow / deny take a list of node names, not a single string")
        mask = under(allow) if allow is not None else np.ones(n, bool)
        if deny is not None:
            mask &= ~under(deny)
        if not mask.any():
            raise ValueError(f"allow={list(allow) if allow is not None else None} and "
                             f"deny={list(deny) if deny is not None else None} leave no leaf to answer with")
        return mask

    def greedy_path(self, marg: Sequence[np.ndarray], row: int) -> list[int]:
        """Indices of the top-down most probable path for one batch row (always full depth)."""
        tax = self.taxonomy
        idx = [int(np.argmax(marg[0][row]))]
        for lvl in range(1, tax.depth):
            kids = tax.children(lvl - 1, idx[-1])
            idx.append(kids[int(np.argmax(marg[lvl][row, kids]))])
        return idx

    def greedy_paths(self, marg: Sequence[np.ndarray]) -> np.ndarray:
        """(batch, depth) `greedy_path` of every row."""
        rows = [self.greedy_path(marg, r) for r in range(len(marg[0]))]
        return np.asarray(rows, np.int64).reshape(len(rows), self.taxonomy.depth)

    def paths(self, logprobs: Sequence[np.ndarray]) -> np.ndarray:
        """(batch, depth) greedy consistent paths — the batch form used by metrics and parity checks."""
        return self.greedy_paths(self.marginals(logprobs))


# ---- out-of-catalogue scores ----------------------------------------------------------------------
# Each maps the *unrestricted* leaf distribution (batch, n_leaves) and the marginals to a score in [0, 1],
# higher = less like anything in the catalogue; `python -m sdk calibrate` picks one and its threshold.
def _leaf_entropy(leaf: np.ndarray, marg: Sequence[np.ndarray]) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(leaf > 0, leaf * np.log(leaf), 0.0).sum(axis=1)
    return h / np.log(max(leaf.shape[1], 2))


UNKNOWN_SCORES = {
    "coarsest_margin": lambda leaf, marg: 1.0 - marg[0].max(axis=1),  # 1 - max marginal at the coarsest level
    "fine_margin": lambda leaf, marg: 1.0 - leaf.max(axis=1),  # 1 - max leaf probability
    "leaf_entropy": _leaf_entropy,  # entropy of the leaf distribution / log(n_leaves)
}
DEFAULT_UNKNOWN_SCORE = "coarsest_margin"


def unknown_scores(kind: str, leaf: np.ndarray, marg: Sequence[np.ndarray]) -> np.ndarray:
    """Out-of-catalogue score per row of a kind in UNKNOWN_SCORES (the Classifier checks the manifest's)."""
    return np.clip(UNKNOWN_SCORES[kind](leaf, marg), 0.0, 1.0)
