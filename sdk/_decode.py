"""Tree-consistent decoding in numpy (ARCHITECTURE.md, "Tree-consistent decoding").

The score of a leaf is the sum over levels of the log-probability of its ancestor at that level; leaf
scores are normalized to a distribution and node marginals are sums of leaf probabilities under each
node. The answer walks down from the root choosing the most probable child of the node chosen above,
so a child's probability never exceeds its parent's, and it stops (backs off) at the deepest level
whose marginal clears that level's threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ._errors import ModelOutputError
from ._taxonomy import Taxonomy


class TreeDecoder:
    """Precomputed index arrays for one taxonomy; `marginals()` works on batches."""

    def __init__(self, taxonomy: Taxonomy):
        self.taxonomy = taxonomy
        self.anc = np.asarray(taxonomy.ancestor_matrix(), dtype=np.int64)  # (n_leaves, depth)
        self.sizes = taxonomy.sizes
        # leaf -> node membership per level, so marginals are one matmul per level
        self.member = []
        for lvl, n in enumerate(self.sizes):
            m = np.zeros((self.anc.shape[0], n))
            m[np.arange(self.anc.shape[0]), self.anc[:, lvl]] = 1.0
            self.member.append(m)

    def check(self, logprobs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(logprobs) != self.taxonomy.depth:
            raise ModelOutputError(f"model returned {len(logprobs)} outputs; taxonomy has {self.taxonomy.depth} levels")
        out = []
        for lvl, lp in enumerate(logprobs):
            lp = np.asarray(lp, dtype=np.float64)
            if lp.ndim == 1:
                lp = lp[None]
            if lp.ndim != 2 or lp.shape[1] != self.sizes[lvl]:
                raise ModelOutputError(
                    f"output of level {lvl} has shape {lp.shape}; expected (batch, {self.sizes[lvl]})")
            if not np.all(np.isfinite(lp) | (lp == -np.inf)) or np.isnan(lp).any() or np.isposinf(lp).any():
                raise ModelOutputError(f"model output of level {lvl} holds NaN or +Inf; refusing to label")
            out.append(lp)
        if len({lp.shape[0] for lp in out}) != 1:
            raise ModelOutputError("outputs disagree on batch size")
        return out

    def marginals(self, logprobs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per level, (batch, n_nodes) marginal probabilities under the tree-consistent leaf distribution."""
        lps = self.check(logprobs)
        score = np.zeros((lps[0].shape[0], self.anc.shape[0]))
        for lvl, lp in enumerate(lps):
            score += lp[:, self.anc[:, lvl]]
        if np.isneginf(score).all(axis=1).any():
            raise ModelOutputError("every leaf has probability zero; the model output is degenerate")
        score -= score.max(axis=1, keepdims=True)
        p = np.exp(score)
        p /= p.sum(axis=1, keepdims=True)
        return [p @ m for m in self.member]

    def greedy_path(self, marg: Sequence[np.ndarray], row: int) -> list[int]:
        """Indices of the top-down most probable path for one batch row (always full depth)."""
        tax = self.taxonomy
        idx = [int(np.argmax(marg[0][row]))]
        for lvl in range(1, tax.depth):
            kids = tax.children(lvl - 1, idx[-1])
            idx.append(kids[int(np.argmax(marg[lvl][row, kids]))])
        return idx

    def paths(self, logprobs: Sequence[np.ndarray]) -> np.ndarray:
        """(batch, depth) greedy consistent paths — the batch form used by metrics and parity checks."""
        marg = self.marginals(logprobs)
        return np.asarray([self.greedy_path(marg, r) for r in range(marg[0].shape[0])], dtype=np.int64)
