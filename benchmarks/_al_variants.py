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
    kmedian        another coverage objective, not a weighting of k-center: greedy
                   facility location (k-median). Each pick j maximises the distance mass
                   it removes, sum_i max(0, c_i - D_ij), where c_i is pool image i's
                   cosine distance to its nearest labeled-or-picked image. k-center goes
                   to the farthest image; this goes where a label brings the most pool
                   images closer to a labeled one (the density-aware direction of
                   TypiClust and ProbCover). Session 11.
    hybrid-kmedian the same, each pool image's term weighted by minmax(u) ** beta: the
                   pick that removes the most *uncertain* distance mass. The oracles of
                   session 10 showed that an image's own error is a poor guide to what
                   its label teaches; this weighs the uncertainty of the images a pick
                   would cover instead. Session 11.
"""
from __future__ import annotations

import heapq

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


def kmedian_greedy(pool: np.ndarray, c0: np.ndarray, budget: int, w: np.ndarray, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Greedy facility location over unit rows `pool` [n, d]: each pick j maximises
    gain_j = sum_i w_i * max(0, c_i - (1 - x_i . x_j)), c starting at `c0` (each row's
    distance to the labeled set) and then lowered by every pick. Lazy: the gains only
    shrink (the objective is submodular), so a candidate whose gain, recomputed now, is
    at least every other candidate's stale bound is the true argmax. Ties go to the lower
    index. -> (picks [B], gain at each pick [B])."""
    X = np.ascontiguousarray(pool, np.float32)
    c = np.minimum(np.asarray(c0, np.float64), 2.0)  # no labeled set: +inf, and 2 is the largest cosine distance
    w = np.asarray(w, np.float64)
    n = len(X)
    gains = np.empty(n)
    for s in range(0, n, block):
        D = 1.0 - X @ X[s:s + block].T  # [n, b]
        gains[s:s + block] = (w[:, None] * np.maximum(c[:, None] - D, 0.0)).sum(0)
    heap = [(-g, j) for j, g in enumerate(gains.tolist())]
    heapq.heapify(heap)
    picks, got, taken = [], [], np.zeros(n, bool)
    while len(picks) < min(budget, n) and heap:
        _, j = heapq.heappop(heap)
        if taken[j]:
            continue
        dj = 1.0 - X @ X[j]  # [n]
        g = float((w * np.maximum(c - dj, 0.0)).sum())
        if not heap or (-g, j) <= heap[0]:  # fresh gain beats every stale bound (ties: lower index)
            picks.append(j), got.append(g)
            taken[j] = True
            c = np.minimum(c, np.maximum(dj, 0.0))
            c[j] = 0.0
        else:
            heapq.heappush(heap, (-g, j))
    return np.asarray(picks, np.int64), np.asarray(got, np.float32)


def kmedian(x: S.SelectionInput) -> S.Selection:
    picks, gain = kmedian_greedy(x.pool, x.nearest.dist, x.budget, np.ones(len(x.pool)))
    return S.Selection(picks, gain)


def hybrid_kmedian(x: S.SelectionInput) -> S.Selection:
    w = S.uncertainty_weights(_u(x, "hybrid-kmedian"), x.beta)
    picks, gain = kmedian_greedy(x.pool, x.nearest.dist, x.budget, w)
    return S.Selection(picks, gain)


VARIANTS = {"hybrid-rank": hybrid_rank, "hybrid-top": hybrid_top, "hybrid-floor": hybrid_floor,
            "kcenter-typ": kcenter_typ, "hybrid-typ": hybrid_typ, "hybrid-smooth": hybrid_smooth,
            "hybrid-beta2": hybrid_beta2, "hybrid-oracle": hybrid_oracle, "hybrid-oracle-pixels": hybrid_oracle_pixels,
            "kmedian": kmedian, "hybrid-kmedian": hybrid_kmedian}
# their u is the current model's true error on each image (active_learning.oracle_uncertainty), not MC dropout:
ORACLE = {"hybrid-oracle": "iou", "hybrid-oracle-pixels": "pixels"}


def register() -> None:
    """Add the variants to novelty's strategy registry, in this process only."""
    S._STRATEGIES.update(VARIANTS)
