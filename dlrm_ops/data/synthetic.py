"""Built-in data generators: no download needed.

``RandomData`` is facebookresearch/dlrm's ``--data-generation random``:
uniform indices, random labels (nothing to learn; for speed runs).
``SyntheticData`` is learnable and realistic: Zipf-like category popularity
per table, log-normal dense features as in the Criteo logs (given to the model
as log(x+1)), and labels drawn from a planted ground-truth model, so the best
achievable AUC (that of the true click probabilities) is known.
"""

from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from .batch import Batch


def _batch_size(data, i: int) -> int:
    if data.num_samples is None:
        return data.batch_size
    return max(0, min(data.batch_size, data.num_samples - i * data.batch_size))


class RandomData:
    """facebookresearch/dlrm's random data: 1 to ``num_indices_per_lookup``
    indices per bag (exactly that many if ``fixed_indices_per_lookup``),
    uniform over the rows or, with ``dist="gaussian"``, normal with mean
    ``mu`` and deviation ``sigma`` clipped to [``lo``, ``hi``], all as
    fractions of the rows; labels 0/1 (``round_targets``) or uniform in
    [0, 1). With ``num_samples`` the last batch holds what is left. Batch i
    is a pure function of (seed, i)."""

    def __init__(
        self,
        num_embeddings: Sequence[int],
        num_dense: int,
        batch_size: int,
        num_batches: int,
        num_indices_per_lookup: int = 10,
        fixed_indices_per_lookup: bool = False,
        seed: int = 0,
        round_targets: bool = True,
        dist: str = "uniform",
        lo: float = 0.0,
        hi: float = 1.0,
        mu: float = -1.0,
        sigma: float = 1.0,
        num_samples: Optional[int] = None,
    ):
        if dist not in ("uniform", "gaussian"):
            raise ValueError(f"dist must be uniform or gaussian, got {dist!r}")
        self.rows = list(num_embeddings)
        self.num_dense, self.batch_size, self.num_batches = num_dense, batch_size, num_batches
        self.L, self.fixed = num_indices_per_lookup, fixed_indices_per_lookup
        self.seed, self.round_targets = seed, round_targets
        self.dist, self.lo, self.hi, self.mu, self.sigma = dist, lo, hi, mu, sigma
        self.num_samples = num_samples

    def _indices(self, rng, n: int, count: int) -> np.ndarray:
        if self.dist == "uniform":
            return rng.integers(0, n, count)
        r = np.clip(rng.normal(self.mu, self.sigma, count), self.lo, self.hi)
        return np.clip(np.round(r * (n - 1)), 0, n - 1).astype(np.int64)

    def batch(self, i: int) -> Batch:
        rng = np.random.default_rng((self.seed, i))
        B, T = _batch_size(self, i), len(self.rows)
        lengths = np.full(T * B, self.L) if self.fixed else rng.integers(1, self.L + 1, T * B)
        per_table = lengths.reshape(T, B).sum(1)
        idx = np.concatenate([self._indices(rng, n, c) for n, c in zip(self.rows, per_table)])
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        dense = rng.random((B, self.num_dense), dtype=np.float32)
        labels = rng.integers(0, 2, B) if self.round_targets else rng.random(B)
        return Batch(
            torch.from_numpy(dense),
            torch.from_numpy(idx.astype(np.int64)),
            torch.from_numpy(offsets),
            torch.from_numpy(labels.astype(np.float32)),
        )

    def __iter__(self) -> Iterator[Batch]:
        return (self.batch(i) for i in range(self.num_batches))

    def __len__(self) -> int:
        return self.num_batches


class SyntheticData:
    """Click logs from a planted model. The true logit of a sample is

        bias + <a, log1p(dense)> + sum_t u_t[c_t] + sum_{(s,t) in pairs} <v_s[c_s], v_t[c_t]>

    with random effects u, rank-``rank`` factors v on ``num_pairs`` random
    table pairs (what a DLRM's dot interaction can learn), and categories c_t
    drawn with Zipf(``zipf_alpha``) popularity. Batches are pure functions of
    (seed, split, batch number), so runs repeat exactly.
    """

    def __init__(
        self,
        num_embeddings: Sequence[int],
        num_dense: int = 13,
        batch_size: int = 256,
        num_batches: int = 1000,
        seed: int = 0,
        zipf_alpha: float = 1.2,
        rank: int = 4,
        num_pairs: Optional[int] = 8,
        signal: float = 1.0,
        num_samples: Optional[int] = None,
    ):
        self.rows = [int(n) for n in num_embeddings]
        self.num_samples = num_samples  # the last batch holds what is left
        self.num_dense, self.batch_size, self.num_batches = num_dense, batch_size, num_batches
        self.seed, self.alpha = seed, zipf_alpha
        T = len(self.rows)
        rng = np.random.default_rng((seed, 0xD1))
        self.perm = [rng.permutation(n) for n in self.rows]
        self.dense_mu = rng.normal(1.0, 1.0, num_dense)
        self.dense_w = rng.normal(0, 0.3, num_dense) * signal
        self.u = [rng.normal(0, 0.3 * signal, n) for n in self.rows]
        self.v = [rng.normal(0, np.sqrt(signal / rank), (n, rank)) for n in self.rows]
        all_pairs = [(s, t) for s in range(T) for t in range(s + 1, T)]
        k = len(all_pairs) if num_pairs is None else min(num_pairs, len(all_pairs))
        self.pairs = (
            [all_pairs[j] for j in rng.choice(len(all_pairs), k, replace=False)] if k else []
        )
        self.bias = -1.0  # about a quarter of samples are clicks, as in Criteo
        self.dense_shift = float(self.dense_w @ np.log1p(np.exp(self.dense_mu)))

    def _categories(self, rng, B):
        cols = []
        for n, perm in zip(self.rows, self.perm):
            ranks = (rng.zipf(self.alpha, B) - 1) % n
            cols.append(perm[ranks])
        return np.stack(cols, 1)

    def true_logits(self, dense_log: np.ndarray, cats: np.ndarray) -> np.ndarray:
        z = self.bias + dense_log @ self.dense_w - self.dense_shift
        for t, u in enumerate(self.u):
            z = z + u[cats[:, t]]
        for s, t in self.pairs:
            z = z + np.einsum("bk,bk->b", self.v[s][cats[:, s]], self.v[t][cats[:, t]])
        return z

    def _draw(self, split: int, i: int):
        rng = np.random.default_rng((self.seed, split, i))
        B = _batch_size(self, i) if split == 0 else self.batch_size
        raw = np.floor(rng.lognormal(self.dense_mu, 1.0, (B, self.num_dense)))
        dense_log = np.log1p(raw).astype(np.float32)
        cats = self._categories(rng, B)
        p = 1.0 / (1.0 + np.exp(-self.true_logits(dense_log, cats)))
        labels = (rng.random(B) < p).astype(np.float32)
        return dense_log, cats, labels, p

    def batch(self, i: int, split: int = 0) -> Batch:
        """Batch i of the training (split 0) or test (split 1) stream."""
        from .batch import batch_from_arrays

        dense, cats, labels, _ = self._draw(split, i)
        return batch_from_arrays(dense, cats, labels)

    def test_batches(self, n: int) -> List[Batch]:
        return [self.batch(i, split=1) for i in range(n)]

    def ceiling_auc(self, n_batches: int) -> float:
        """AUC of the true click probabilities on the first n test batches:
        the best any model can reach there."""
        draws = [self._draw(1, i) for i in range(n_batches)]
        return float(
            roc_auc_score(
                np.concatenate([d[2] for d in draws]), np.concatenate([d[3] for d in draws])
            )
        )

    def __iter__(self) -> Iterator[Batch]:
        return (self.batch(i) for i in range(self.num_batches))

    def __len__(self) -> int:
        return self.num_batches
