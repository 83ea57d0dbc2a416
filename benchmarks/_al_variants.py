"""Candidate changes to the hybrid strategy, tried by the active-learning benchmark
through the real `novelty select` (the strategy registry is extended in-process; the
library is not edited). Each is a function (SelectionInput) -> Selection, the shape of
the functions in novelty/strategies.py, so the one that wins can move there as is.

    hybrid-rank    kcenter weighted by the uncertainty's rank in the pool (n-th
                   percentile ** beta) instead of its min-max scaled value: an outlier
                   score no longer squeezes every other weight towards 0
    hybrid-top     candidates first, then coverage (Zhdanov 2019, "diverse mini-batch
                   active learning"): plain k-center restricted to the 3*B most uncertain
                   pool images (weight 1 for them, 0 for the others)
    hybrid-floor   kcenter with w = 0.5 + 0.5 * minmax(u): uncertainty breaks ties between
                   equally far images but never vetoes a far one
    kcenter-typ    kcenter weighted by typicality (TypiClust, Hacohen et al. 2022: the
                   inverse mean distance to the K = 20 nearest pool images, over its
                   max): an isolated outlier no longer wins by being far
    hybrid-typ     hybrid's weight times that typicality
    hybrid-smooth  hybrid with each image's uncertainty replaced by its mean over its
                   K = ceil(pool / budget) nearest pool images (itself included): the
                   per-image MC-dropout score is a noisy estimate of how hard the model
                   finds a region, and K is about the number of pool images one pick
                   stands for. Session 6.
    hybrid-beta2   hybrid with beta = 2 (w = minmax(u) ** 2), whatever --beta says. beta = 4
                   lost at 500 steps, when the score did not track the errors (Spearman
                   -0.03); with --seed-copies 1 --pool-copies 3 it does (+0.59). Session 9.
    hybrid-oracle  hybrid exactly (w = minmax(u) ** beta), but active_learning.py imports
                   as u each pool image's true error under the current model (1 - its
                   IoU, from the hidden masks) instead of running MC dropout. Not a
                   method: the ceiling of any uncertainty score in hybrid's weighting.
                   Session 10.
    hybrid-oracle-pixels  the same with u = the number of pixels the current model gets
                   wrong in the image (the amount of error, not 1 - IoU: an image with
                   one tiny object can have 1 - IoU near 1 and few wrong pixels).
                   Session 10, after hybrid-oracle lost.
"""
from __future__ import annotations

import numpy as np

from novelty import strategies as S

CANDIDATES = 3  # hybrid-top: candidates per pick
TYPICALITY_K = 20  # TypiClust's K


def _u(x: S.SelectionInput, name: str) -> np.ndarray:
    return np.asarray(S._need_uncertainty(x, name), np.float64)


def hybrid_rank(x: S.SelectionInput) -> S.Selection:
    u = _u(x, "hybrid-rank")
    rank = np.argsort(np.argsort(u, kind="stable"), kind="stable")  # 0 .. n-1
    w = ((rank + 1) / len(u)) ** x.beta
    return S.kcenter(x, w.astype(np.float32))


def hybrid_top(x: S.SelectionInput) -> S.Selection:
    u = _u(x, "hybrid-top")
    w = np.zeros(len(u), np.float32)
    w[S.top(u, min(len(u), CANDIDATES * x.budget))] = 1.0
    return S.kcenter(x, w)


def hybrid_floor(x: S.SelectionInput) -> S.Selection:
    w = 0.5 + 0.5 * S.uncertainty_weights(_u(x, "hybrid-floor"), x.beta)
    return S.kcenter(x, w.astype(np.float32))


def typicality(pool: np.ndarray, k: int = TYPICALITY_K, block: int = 2048) -> np.ndarray:
    """[n] in (0, 1]: 1 / mean Euclidean distance to the k nearest other pool rows
    (unit rows: |a - b| = sqrt(2 - 2 a.b)), divided by its max. Exact, block-wise."""
    X = np.asarray(pool, np.float32)
    k = min(k, len(X) - 1)
    if k < 1:
        return np.ones(len(X), np.float32)
    out = np.empty(len(X), np.float64)
    for s in range(0, len(X), block):
        S = X[s:s + block] @ X.T  # [b, n]
        S[np.arange(len(S)), np.arange(s, s + len(S))] = -np.inf  # not itself
        near = -np.partition(-S, k - 1, axis=1)[:, :k]  # the k largest similarities
        out[s:s + block] = np.sqrt(np.maximum(2.0 - 2.0 * near, 0.0)).mean(1)
    typ = 1.0 / np.maximum(out, 1e-6)
    return (typ / typ.max()).astype(np.float32)


def knn_mean(pool: np.ndarray, values: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """[n]: the mean of `values` over each pool row's k nearest pool rows by cosine
    similarity (unit rows), itself included. Exact, block-wise."""
    X = np.asarray(pool, np.float32)
    v = np.asarray(values, np.float64)
    k = max(1, min(k, len(X)))
    out = np.empty(len(X), np.float64)
    for s in range(0, len(X), block):
        S = X[s:s + block] @ X.T  # [b, n]
        S[np.arange(len(S)), np.arange(s, s + len(S))] = np.inf  # itself first, whatever the rounding
        near = np.argpartition(-S, k - 1, axis=1)[:, :k]
        out[s:s + block] = v[near].mean(1)
    return out


def hybrid_smooth(x: S.SelectionInput) -> S.Selection:
    u = _u(x, "hybrid-smooth")
    k = -(-len(u) // max(1, x.budget))  # ceil(pool / budget)
    return S.kcenter(x, S.uncertainty_weights(knn_mean(x.pool, u, k), x.beta))


def hybrid_beta2(x: S.SelectionInput) -> S.Selection:
    return S.kcenter(x, S.uncertainty_weights(_u(x, "hybrid-beta2"), 2.0))


def hybrid_oracle(x: S.SelectionInput) -> S.Selection:
    return S.kcenter(x, S.uncertainty_weights(_u(x, "hybrid-oracle"), x.beta))


def hybrid_oracle_pixels(x: S.SelectionInput) -> S.Selection:
    return S.kcenter(x, S.uncertainty_weights(_u(x, "hybrid-oracle-pixels"), x.beta))


def kcenter_typ(x: S.SelectionInput) -> S.Selection:
    return S.kcenter(x, typicality(x.pool))


def hybrid_typ(x: S.SelectionInput) -> S.Selection:
    w = S.uncertainty_weights(_u(x, "hybrid-typ"), x.beta) * typicality(x.pool)
    return S.kcenter(x, w.astype(np.float32))


VARIANTS = {"hybrid-rank": hybrid_rank, "hybrid-top": hybrid_top, "hybrid-floor": hybrid_floor,
            "kcenter-typ": kcenter_typ, "hybrid-typ": hybrid_typ, "hybrid-smooth": hybrid_smooth,
            "hybrid-beta2": hybrid_beta2, "hybrid-oracle": hybrid_oracle, "hybrid-oracle-pixels": hybrid_oracle_pixels}
# their u is the current model's true error on each image (active_learning.oracle_uncertainty), not MC dropout:
ORACLE = {"hybrid-oracle": "iou", "hybrid-oracle-pixels": "pixels"}


def register() -> None:
    """Add the variants to novelty's strategy registry, in this process only."""
    S._STRATEGIES.update(VARIANTS)
