"""Small synthetic click files in the formats the readers take, for the README's examples and quick runs.

Every value is generated (seeded, so the files are the same on every machine): no row of a real
data set is copied. Each file plants a click model (per-id effects on some fields, dense effects)
so that a model trained on it learns something (val AUC clearly above 0.5), Zipf-skewed ids and
missing values, like the real logs whose layout it copies:

=========================  ==========================================================================
``criteo_sample.tsv``      Criteo Kaggle ``train.txt`` layout: ``label``, ``I1``..``I13`` (integer counts,
                           ``-1`` in ``I2``, some missing), ``C1``..``C26`` (8 hex digits, some missing);
                           tab-separated, no header (``data=criteo_tsv``)
``avazu_sample.csv``       Avazu ``train.csv`` layout with its header: ``id``, ``click``, ``hour``
                           (YYMMDDHH over 10 days), 21 categorical columns (``data=tabular``'s defaults)
``clicks_ts.csv``          a click log with a Unix timestamp ``ts``, a log-normal ``price``, a ``ratio``
                           and ``user`` / ``item`` / ``site`` (``data=tabular`` with ``data.dense``; see
                           ``bench.tabular_transforms``)
=========================  ==========================================================================

Run (``make data`` does this)::

    python -m torchrec_shark.data.samples --out data/samples
"""

from __future__ import annotations

import argparse
import os
from typing import Dict, List, Sequence

import numpy as np

# Per-field cardinalities and missing rates of the Criteo-format sample (of the order of a 10k-row
# head of the Kaggle file: 3 to ~5,000 distinct values, a few mostly-missing fields).
CRITEO_CARDINALITIES = [1400, 550, 5500, 3200, 200, 15, 5000, 300, 3, 2800, 2500, 5200, 2300,
                        25, 2700, 4600, 10, 1700, 600, 3, 4900, 10, 14, 2200, 40, 1800]
CRITEO_MISSING = {i: 0.4 for i in (18, 19, 24, 25)} | {21: 0.8, 2: 0.03, 3: 0.03}
CRITEO_DENSE_MISSING = [0.45, 0.0, 0.2, 0.2, 0.03, 0.22, 0.04, 0.0, 0.04, 0.45, 0.04, 0.77, 0.2]

AVAZU_COLUMNS: Dict[str, int] = {  # categorical column -> distinct values
    "C1": 7, "banner_pos": 7, "site_id": 800, "site_domain": 700, "site_category": 20, "app_id": 500,
    "app_domain": 50, "app_category": 20, "device_id": 1500, "device_ip": 8000, "device_model": 1500,
    "device_type": 5, "device_conn_type": 4, "C14": 1500, "C15": 8, "C16": 9, "C17": 400, "C18": 4,
    "C19": 60, "C20": 150, "C21": 60,
}
AVAZU_HEX = {"site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category", "device_id",
             "device_ip", "device_model"}


def _zipf_ids(rng: np.random.Generator, rows: int, cardinality: int, exponent: float = 1.2) -> np.ndarray:
    return (rng.zipf(exponent, rows) - 1) % cardinality


def _labels(rng: np.random.Generator, logit: np.ndarray, ctr: float) -> np.ndarray:
    """Bernoulli labels whose mean is about ``ctr``: the logit shifted to that rate."""
    lo, hi = -20.0, 20.0
    for _ in range(50):  # bisection on the offset
        mid = (lo + hi) / 2
        if (1 / (1 + np.exp(-(logit + mid)))).mean() < ctr:
            lo = mid
        else:
            hi = mid
    return (rng.random(len(logit)) < 1 / (1 + np.exp(-(logit + lo)))).astype(np.int64)


def _field_effects(rng: np.random.Generator, cardinalities: Sequence[int], informative: Sequence[int],
                   scale: float) -> List[np.ndarray]:
    return [rng.normal(0.0, scale, c) if i in informative else np.zeros(c) for i, c in enumerate(cardinalities)]


def write_criteo_tsv(path: str, rows: int = 10_000, seed: int = 0) -> None:
    """A Criteo-format sample (see the module docstring)."""
    rng = np.random.default_rng(seed)
    ids = [_zipf_ids(rng, rows, c) for c in CRITEO_CARDINALITIES]
    hexes = [rng.choice(2**32, size=c, replace=False) for c in CRITEO_CARDINALITIES]
    effects = _field_effects(rng, CRITEO_CARDINALITIES, informative=range(0, 26, 2), scale=0.8)
    dense = np.stack([rng.geometric(p, rows) - 1 for p in np.linspace(0.02, 0.5, 13)], axis=1)
    dense[:, 1] -= (rng.random(rows) < 0.1).astype(np.int64) * (dense[:, 1] + 1)  # I2 holds -1s
    logit = sum(e[i] for e, i in zip(effects, ids)) + 0.4 * np.log1p(np.maximum(dense[:, 0], 0)) \
        - 0.3 * np.log1p(np.maximum(dense[:, 4], 0))
    labels = _labels(rng, logit, ctr=0.25)
    dense_missing = rng.random((rows, 13)) < np.array(CRITEO_DENSE_MISSING)
    cat_missing = [rng.random(rows) < CRITEO_MISSING.get(i, 0.0) for i in range(26)]
    with open(path, "w") as f:
        for r in range(rows):
            ints = ["" if dense_missing[r, j] else str(dense[r, j]) for j in range(13)]
            cats = ["" if cat_missing[j][r] else f"{hexes[j][ids[j][r]]:08x}" for j in range(26)]
            f.write("\t".join([str(labels[r]), *ints, *cats]) + "\n")


def write_avazu_csv(path: str, rows: int = 10_000, seed: int = 0) -> None:
    """An Avazu-format sample (see the module docstring)."""
    import pandas as pd

    rng = np.random.default_rng(seed + 100)
    names, cards = list(AVAZU_COLUMNS), list(AVAZU_COLUMNS.values())
    ids = [_zipf_ids(rng, rows, c, 1.4) for c in cards]
    informative = [names.index(n) for n in ("banner_pos", "site_id", "app_id", "device_model", "C14", "C17", "C20")]
    effects = _field_effects(rng, cards, informative, scale=0.9)
    day, hour = rng.integers(21, 31, rows), rng.integers(0, 24, rows)
    logit = sum(e[i] for e, i in zip(effects, ids)) + 0.5 * np.sin(hour / 24 * 2 * np.pi)
    columns = {
        "id": rng.integers(10**18, 10**19 - 1, rows, dtype=np.uint64).astype(str),
        "click": _labels(rng, logit, ctr=0.17),
        "hour": 14100000 + day * 100 + hour,
    }
    for name, card, col in zip(names, cards, ids):
        if name in AVAZU_HEX:
            values = np.array([f"{v:08x}" for v in rng.choice(2**32, size=card, replace=False)])
        else:
            values = np.sort(rng.choice(card * 10 if name.startswith("C") else card, card, replace=False))
            values = values + (1000 if name == "C1" else 0)  # Avazu's C1 codes are 100x
        columns[name] = values[col]
    pd.DataFrame(columns).to_csv(path, index=False)


def write_samples(out: str, rows: int = 10_000, seed: int = 0) -> Dict[str, str]:
    """All sample files under ``out``; returns ``{name: path}``."""
    from torchrec_shark.bench.tabular_transforms import write_timestamp_table

    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, name) for name in ("criteo_sample.tsv", "avazu_sample.csv", "clicks_ts.csv")}
    write_criteo_tsv(paths["criteo_sample.tsv"], rows, seed)
    write_avazu_csv(paths["avazu_sample.csv"], rows, seed)
    write_timestamp_table(paths["clicks_ts.csv"], 2 * rows, seed)
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/samples")
    p.add_argument("--rows", type=int, default=10_000, help="rows of the Criteo and Avazu samples (twice that in clicks_ts)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name, path in write_samples(args.out, args.rows, args.seed).items():
        print(f"{path}: {os.path.getsize(path):,} bytes")


if __name__ == "__main__":
    main()
