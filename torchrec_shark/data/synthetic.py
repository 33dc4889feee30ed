"""Synthetic click data from a planted model, generated in memory.

Every sparse field draws ids from a Zipf law (``zipf_exponent``, see :func:`zipf_ranks`)
over a seed-dependent permutation of its rows, so hot ids are spread over the whole id range. The label is
``Bernoulli(sigmoid(logit))`` with::

    logit = b + w . tanh(dense) + sum_j m_j(bag_j) + sum_{pairs (j, k)} <z_j(bag_j), z_k(bag_k)>

``m_j[id]`` is a per-id main effect and ``z_j[id]`` a per-id latent of ``intrinsic_dim - 1``
dimensions shared with the field's partner (same intrinsic dimension); a bag pools by sum,
like a ``sum``-pooled table. A field with ``intrinsic_dim == 1`` has a main effect only; the
``num_noise_fields`` noise fields have no effect at all. Effects shrink with an id's
frequency rank (``(1 + rank / 1000) ** -0.5``, zero beyond rank 65536) so the signal sits
on ids that training sees often. Each term is scaled to a target variance: pairs with more
latent dimensions carry more signal, so importance grows with intrinsic dimension.

Rows come in blocks of :data:`BLOCK` rows, block ``i`` of a split drawn from
``np.random.default_rng([seed, split_id, i])``: the data do not depend on the batch size,
the world size or the order in which batches are asked for.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from torchrec_shark.config import SyntheticDataConfig
from torchrec_shark.data.columns import Columns, IndexedDataset
from torchrec_shark.data.types import DataError

BLOCK = 1024
_SPLIT_IDS = {"train": 0, "val": 1, "calibration": 2}
_PARAMS_STREAM = 7  # rng stream of the planted parameters
HOT_ROWS = 1 << 16  # ids of frequency rank >= HOT_ROWS have no effect
RANK_SCALE = 1000.0  # effect of the id of rank r: (1 + r / RANK_SCALE) ** -0.5
MIN_ROWS_PER_DIM = 8  # a field of intrinsic dimension k needs >= 8 k rows
CALIBRATION_BLOCKS = 64
# Target variances of the logit terms (times signal_scale).
DENSE_VAR = 0.4
SINGLE_VARS = (0.10, 0.35)  # main-effect-only fields: evenly spread over this range
PAIR_MAIN_VARS = (0.10, 0.05)  # main effects of the two fields of a pair


def pair_interaction_var(k: int) -> float:
    """Target variance of the interaction of a pair of intrinsic dimension ``k``."""
    return 0.3 * float(np.sqrt(k))


class _Draw:
    """Raw randomness of one block: dense features, frequency ranks, bag lengths, label noise."""

    __slots__ = ("dense", "ranks", "lengths", "u_label")

    def __init__(self, dense, ranks, lengths, u_label):
        self.dense = dense
        self.ranks: List[np.ndarray] = ranks
        self.lengths: List[Optional[np.ndarray]] = lengths
        self.u_label = u_label


class SyntheticClicks(IndexedDataset):
    """The ``synthetic`` source. See the module docstring for the planted model."""

    def __init__(self, cfg: SyntheticDataConfig):
        self.cfg = cfg
        cards = [int(c) for c in cfg.cardinalities]
        F = len(cards)
        if F == 0:
            raise DataError("data.synthetic.cardinalities is empty")
        if min(cards) < 1:
            raise DataError(f"data.synthetic.cardinalities must be >= 1, got {cards}")
        if not 0 <= cfg.num_noise_fields <= F:
            raise DataError(f"data.synthetic.num_noise_fields={cfg.num_noise_fields} must be in [0, {F}]")
        bad = [j for j in cfg.multi_hot_fields if not 0 <= j < F]
        if bad:
            raise DataError(f"data.synthetic.multi_hot_fields {bad} are not field indices in [0, {F})")
        if cfg.max_bag_size < 1 or cfg.num_dense < 0 or cfg.zipf_exponent <= 0:
            raise DataError("data.synthetic: max_bag_size must be >= 1, num_dense >= 0, zipf_exponent > 0")
        if not 0.0 < cfg.base_ctr < 1.0:
            raise DataError(f"data.synthetic.base_ctr={cfg.base_ctr} must be in (0, 1)")
        width = max(2, len(str(F - 1)))
        self.feature_names = [f"f{j:0{width}d}" for j in range(F)]
        self.num_embeddings_per_feature = cards
        self.num_dense = int(cfg.num_dense)
        self.multi_hot = [j in set(cfg.multi_hot_fields) for j in range(F)]
        rng = np.random.default_rng([cfg.seed, _PARAMS_STREAM])

        # Roles: noise fields, pairs (largest intrinsic dimension first), main-effect-only fields.
        noise = set(rng.choice(F, size=cfg.num_noise_fields, replace=False).tolist())
        free = [j for j in rng.permutation(F).tolist() if j not in noise]
        self.intrinsic_dim = [0] * F
        self.partner: List[Optional[int]] = [None] * F
        self.pairs: List[Tuple[int, int]] = []
        for k in sorted(cfg.pair_dims, reverse=True):
            fits = [j for j in free if cards[j] >= MIN_ROWS_PER_DIM * k]
            if k < 2 or len(fits) < 2 or len(free) < 3:
                continue
            j, l = fits[:2]
            free = [i for i in free if i not in (j, l)]
            self.pairs.append((j, l))
            self.intrinsic_dim[j] = self.intrinsic_dim[l] = int(k)
            self.partner[j], self.partner[l] = l, j
        for j in free:
            self.intrinsic_dim[j] = 1

        self._perm = [rng.permutation(n) for n in cards]  # frequency rank -> id

        # Per-id effects, indexed by frequency rank (row `hot` of each table is the zero effect).
        self._hot = [min(n, HOT_ROWS) for n in cards]
        decay = [(1.0 + np.arange(h) / RANK_SCALE) ** -0.5 for h in self._hot]
        self._main: List[Optional[np.ndarray]] = [None] * F
        self._latent: List[Optional[np.ndarray]] = [None] * F
        for j in range(F):
            if self.intrinsic_dim[j] == 0:
                continue
            self._main[j] = np.append(rng.standard_normal(self._hot[j]) * decay[j], 0.0)
            if self.partner[j] is not None:
                z = rng.standard_normal((self._hot[j], self.intrinsic_dim[j] - 1)) * decay[j][:, None]
                self._latent[j] = np.vstack([z, np.zeros((1, z.shape[1]))])
        self._w = np.zeros(self.num_dense)
        if self.num_dense:
            active = rng.choice(self.num_dense, size=(self.num_dense + 1) // 2, replace=False)
            self._w[active] = rng.standard_normal(len(active))
        self._bias = 0.0
        self._calibrate(rng)
        self._row_of_id: Optional[List[np.ndarray]] = None
        self._truth: Optional[Dict] = None

    # --- generation -----------------------------------------------------------------
    def num_rows(self, split: str) -> int:
        return int(self.cfg.num_train_samples if split == "train" else self.cfg.num_val_samples)

    def rows(self, split: str, start: int, stop: int) -> Columns:
        first, last = start // BLOCK, (stop - 1) // BLOCK
        parts = [self._block(split, b) for b in range(first, last + 1)]
        cols = Columns.concat(parts)
        off = first * BLOCK
        return cols.slice(start - off, stop - off)

    def _block(self, split: str, block: int) -> Columns:
        d = self._draw(_SPLIT_IDS[split], block)
        logits = self._logits(d.dense, self._effect_rows(d.ranks), d.lengths)
        labels = (d.u_label < _sigmoid(logits)).astype(np.float32)
        ids = [perm[r] for perm, r in zip(self._perm, d.ranks)]
        return Columns(d.dense, labels, ids, d.lengths)

    def _draw(self, split_id: int, block: int) -> _Draw:
        rng = np.random.default_rng([self.cfg.seed, split_id, block])
        n, F = BLOCK, len(self._perm)
        dense = rng.standard_normal((n, self.num_dense), dtype=np.float32)
        multi = [j for j in range(F) if self.multi_hot[j]]
        bag = rng.integers(1, self.cfg.max_bag_size + 1, size=(len(multi), n), dtype=np.int32)
        lengths: List[Optional[np.ndarray]] = [None] * F
        for i, j in enumerate(multi):
            lengths[j] = bag[i]
        counts = np.array([n if ln is None else int(ln.sum()) for ln in lengths])
        cards = np.repeat(np.asarray(self.num_embeddings_per_feature), counts)
        ranks = zipf_ranks(rng.random(len(cards)), cards, self.cfg.zipf_exponent)
        return _Draw(dense, np.split(ranks, np.cumsum(counts)[:-1]), lengths, rng.random(n))

    def _effect_rows(self, ranks: Sequence[np.ndarray]) -> List[np.ndarray]:
        return [np.minimum(r, h) for r, h in zip(ranks, self._hot)]

    def _terms(self, dense, rows, lengths):
        """Logit terms: dense ``[n]``, main effect per field ``[F, n]``, interaction per pair ``[P, n]``."""
        n = len(dense)
        dense_term = np.tanh(dense, dtype=np.float64) @ self._w if self.num_dense else np.zeros(n)
        main = np.zeros((len(rows), n))
        pooled: Dict[int, np.ndarray] = {}
        for j, (r, ln) in enumerate(zip(rows, lengths)):
            if self._main[j] is None:
                continue
            main[j] = _pool(self._main[j][r], ln)
            if self._latent[j] is not None:
                pooled[j] = _pool(self._latent[j][r], ln)
        inter = np.array([np.einsum("nd,nd->n", pooled[j], pooled[k]) for j, k in self.pairs]).reshape(-1, n)
        return dense_term, main, inter

    def _logits(self, dense, rows, lengths) -> np.ndarray:
        dense_term, main, inter = self._terms(dense, rows, lengths)
        return self._bias + dense_term + main.sum(0) + inter.sum(0)

    # --- planted model ----------------------------------------------------------------
    def _calibrate(self, rng: np.random.Generator) -> None:
        """Scale every term to its target variance, then set the bias for the base CTR."""
        draws = [self._draw(_SPLIT_IDS["calibration"], b) for b in range(CALIBRATION_BLOCKS)]

        def calibration_terms():
            terms = [self._terms(d.dense, self._effect_rows(d.ranks), d.lengths) for d in draws]
            return tuple(np.concatenate(t, axis=-1) for t in zip(*terms))

        gain = float(self.cfg.signal_scale)
        dense_term, main, inter = calibration_terms()
        if self.num_dense:
            self._w *= np.sqrt(gain * DENSE_VAR / dense_term.var())
        singles = [j for j in range(len(main)) if self.intrinsic_dim[j] == 1]
        targets = dict(zip(rng.permutation(singles).tolist(), np.linspace(*SINGLE_VARS, num=len(singles))))
        for p, (j, k) in enumerate(self.pairs):
            targets[j], targets[k] = PAIR_MAIN_VARS
            c = np.sqrt(np.sqrt(gain * pair_interaction_var(self.intrinsic_dim[j]) / inter[p].var()))
            self._latent[j] *= c
            self._latent[k] *= c
        for j, t in targets.items():
            self._main[j] *= np.sqrt(gain * t / max(main[j].var(), 1e-12))
        dense_term, main, inter = calibration_terms()
        rest = dense_term + main.sum(0) + inter.sum(0)
        lo, hi = -30.0, 30.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if _sigmoid(mid + rest).mean() < self.cfg.base_ctr else (lo, mid)
        self._bias = 0.5 * (lo + hi)
        contrib = main.copy()
        for p, (j, k) in enumerate(self.pairs):
            contrib[j] += inter[p]
            contrib[k] += inter[p]
        self._importance = contrib.var(axis=1)
        self._calibration_ctr = float(_sigmoid(self._bias + rest).mean())

    def true_logits(self, dense: np.ndarray, ids: Sequence[np.ndarray], lengths: Sequence[Optional[np.ndarray]]):
        """Planted logits of rows given as ids (as in a batch) rather than ranks."""
        if self._row_of_id is None:
            self._row_of_id = []
            for perm, h in zip(self._perm, self._hot):
                rank = np.empty_like(perm)
                rank[perm] = np.arange(len(perm))
                self._row_of_id.append(np.minimum(rank, h))
        rows = [lookup[np.asarray(v)] for lookup, v in zip(self._row_of_id, ids)]
        return self._logits(np.asarray(dense), rows, list(lengths))

    def batch_logits(self, batch) -> np.ndarray:
        """Planted logits of a :class:`~torchrec.datasets.utils.Batch` of this source."""
        cols = Columns.from_batch(batch, self.feature_names)
        return self.true_logits(cols.dense, cols.ids, cols.lengths)

    def truth(self) -> Dict:
        if self._truth is not None:
            return self._truth
        n_val = self.num_rows("val")
        logits, labels = [], []
        for b in range((n_val + BLOCK - 1) // BLOCK):
            d = self._draw(_SPLIT_IDS["val"], b)
            lg = self._logits(d.dense, self._effect_rows(d.ranks), d.lengths)
            logits.append(lg)
            labels.append(d.u_label < _sigmoid(lg))
        logits = np.concatenate(logits)[:n_val]
        labels = np.concatenate(labels)[:n_val]
        fields = {}
        for j, name in enumerate(self.feature_names):
            fields[name] = {
                "cardinality": self.num_embeddings_per_feature[j],
                "informative": self.intrinsic_dim[j] > 0,
                "importance": float(self._importance[j]),
                "intrinsic_dim": self.intrinsic_dim[j],
                "multi_hot": self.multi_hot[j],
                "partner": None if self.partner[j] is None else self.feature_names[self.partner[j]],
            }
        informative = [f for f in self.feature_names if fields[f]["informative"]]
        self._truth = {
            "fields": fields,
            "importance_order": sorted(informative, key=lambda f: -fields[f]["importance"]),
            "noise_fields": [f for f in self.feature_names if not fields[f]["informative"]],
            "base_ctr": float(labels.mean()),
            "calibration_ctr": self._calibration_ctr,
            "bayes_auc_val": auc(labels, logits),
            "bias": self._bias,
            "dense_weights": self._w.tolist(),
            "importance": "variance of the field's logit terms (main effect + its pair's interaction)",
            "intrinsic_dim": "1 main effect + (k - 1) latent dimensions shared with the partner; 0 = noise",
        }
        return self._truth


def zipf_ranks(u: np.ndarray, n: np.ndarray, s: float) -> np.ndarray:
    """Frequency ranks in ``[0, n)`` by inverse CDF: ``floor(x) - 1`` for ``x`` of density
    ``~ x ** -s`` on ``[1, n + 1)``, so ``P(rank = r) ~ (r + 1) ** -s`` (a Zipf law)."""
    if abs(s - 1.0) < 1e-9:
        x = np.power(n + 1.0, u)
    else:
        e = 1.0 - s
        x = np.power(1.0 + u * (np.power(n + 1.0, e) - 1.0), 1.0 / e)
    return np.minimum(x.astype(np.int64) - 1, n - 1)


def _pool(values: np.ndarray, lengths: Optional[np.ndarray]) -> np.ndarray:
    if lengths is None:
        return values
    return np.add.reduceat(values, np.cumsum(lengths) - lengths, axis=0)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula (ties in ``scores`` broken arbitrarily)."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    pos = labels.sum()
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))
