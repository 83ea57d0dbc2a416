"""The greedy loops behind kcenter.py, on rows of the pool in blocks: the plain loop
(one matrix-vector product per pick), the driver of the pruned loop (_lazy), the first
pick without labeled rows, and the handling of bitwise-identical rows."""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from ._rows import BLOCK, check_rows, duplicate_groups, unit_rows
from .errors import ConfigError

log = logging.getLogger("novelty.kcenter")


class Dups:
    """Bitwise-identical pool rows have equal d in exact arithmetic, but float32 products
    at different positions of a GEMM can round them apart. When the argmax lands in such
    a group, the pick goes to the group's unpicked row of largest weight, ties to the
    lower index: the exact-arithmetic answer. Unless the top priority is 0 (every row
    left is covered, or weighs 0): then all rows tie, and the argmax, the lowest row
    left, is the answer as it stands."""

    def __init__(self, x: np.ndarray, w: np.ndarray | None):
        self.groups = duplicate_groups(x)
        self.of = {int(j): rep for rep, mem in self.groups.items() for j in mem}
        self.w = w

    def copies(self, i: int) -> np.ndarray:
        """The other rows identical to row i: at distance 0 from it once it is picked (in
        float32 they may come out at 1e-7, which would order them by weight after the
        rest is covered)."""
        rep = self.of.get(i)
        return np.empty(0, np.int64) if rep is None else self.groups[rep][self.groups[rep] != i]

    def resolve(self, i: int, picked, prio: float) -> int:
        """i: the argmax, of priority `prio`; picked(rows) -> bool mask."""
        rep = self.of.get(i)
        if rep is None or prio <= 0:
            return i
        free = self.groups[rep][~picked(self.groups[rep])]
        return int(free[0] if self.w is None else free[np.argmax(self.w[free])])


class Trace:
    """What each pick records: pool row, w * d and d at pick time, covering radius after."""

    def __init__(self, budget: int, progress: Callable[[int], object] | None = None):
        self.picks = np.empty(budget, np.int64)
        self.priority = np.empty(budget, np.float32)
        self.dist = np.empty(budget, np.float32)
        self.radius = np.empty(budget, np.float32)
        self.progress = progress  # called with 1 after each pick (a progress bar's update)

    def put(self, t: int, row: int, prio: float, d: float, radius: float) -> None:
        self.picks[t], self.priority[t], self.dist[t], self.radius[t] = row, prio, d, radius
        if self.progress is not None:
            self.progress(1)


def check_inputs(pool, labeled, budget, weights):
    """-> (pool, labeled, budget clipped to the pool, weights float32 or None); ConfigError."""
    pool, labeled = check_rows(pool, "pool"), check_rows(labeled, "labeled")
    if budget <= 0:
        raise ConfigError(f"budget must be > 0, got {budget}")
    if len(labeled) and labeled.shape[1] != pool.shape[1]:
        raise ConfigError(f"pool rows have {pool.shape[1]} dims but labeled rows {labeled.shape[1]}")
    if weights is not None:
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        if weights.shape != (len(pool),):
            raise ConfigError(f"weights must have shape ({len(pool)},), got {weights.shape}")
        if not np.all(np.isfinite(weights)) or (weights < 0).any():
            raise ConfigError("weights must be finite and >= 0")
    if budget > len(pool):
        log.info("budget %d >= pool size %d: picking the whole pool", budget, len(pool))
    return pool, labeled, min(int(budget), len(pool)), weights


def first_pick(x: np.ndarray, inv: np.ndarray, w: np.ndarray | None, block: int = 16384) -> int:
    """Without labeled rows: the row maximising w_i * (1 - x_i . m), m the unit mean of the
    pool's unit rows (the row farthest from the mean when unweighted), ties to the lower
    index. A zero mean makes every row equally far: row 0 (or the highest weight)."""
    n, dim = x.shape
    mean = np.zeros(dim, np.float64)
    for s in range(0, n, block):
        mean += unit_rows(x, inv, slice(s, s + block)).sum(axis=0, dtype=np.float64)
    norm = np.linalg.norm(mean)
    mean = (mean / norm if norm > 0 else mean).astype(np.float32)
    score = np.empty(n, np.float32)
    for s in range(0, n, block):
        score[s:s + block] = np.float32(1.0) - unit_rows(x, inv, slice(s, s + block)) @ mean
    if w is not None:
        score *= w
    return int(np.argmax(score))


def lazy_loop(lazy, tr: Trace, t: int, budget: int, give_up: float | None, stats: dict, first: bool, dups: Dups) -> int:
    """Picks t..budget-1 with the pruned loop; stops early (returns t) past cfg.give_up."""
    from ._lazy import DONE

    n = len(lazy.perm)
    if dups.groups:
        pos = np.empty(n, np.int64)
        pos[lazy.perm] = np.arange(n)
    weighted = lazy.wp is not None
    t_start = t
    while t < budget:
        i = lazy.top(True)
        if t > t_start and not weighted:  # the covering radius after the last pick: this max
            tr.radius[t - 1] = max(float(lazy.dp[i]), 0.0)
        if dups.groups:
            row = dups.resolve(int(lazy.perm[i]), lambda rows: lazy.applied[pos[rows]] == DONE, float(lazy.pp[i]))
            row, prio, dist = lazy.pick(int(pos[row]), d_at=float(lazy.dp[i]))
            lazy.cover(pos[dups.copies(row)])
        else:
            row, prio, dist = lazy.pick(i)
        tr.put(t, row, prio, dist, float(lazy.dp[lazy.top(False)]) if weighted else np.nan)
        t += 1
        if give_up is not None and t >= 64 and lazy.work > give_up * n * (t - first):
            log.info("k-center: pruning does not pay here (%.0f%% of the plain work); plain loop from pick %d",
                     100 * lazy.work / (n * t), t)
            stats["fell_back_at"] = t
            break
    if not weighted and t > t_start:
        tr.radius[t - 1] = float(lazy.dp[lazy.top(False)])
    return t


def dist_to(x, inv, p, block: int = BLOCK) -> np.ndarray:
    """[n] float32 cosine distance from every row to the unit row p, clipped at 0."""
    d = np.empty(len(x), np.float32)
    for s in range(0, len(x), block):
        d[s:s + block] = np.maximum(np.float32(1.0) - unit_rows(x, inv, slice(s, s + block)) @ p, 0)
    return d


def plain_loop(x, inv, d, w, tr: Trace, t: int, budget: int, max_bytes: int, block: int = BLOCK) -> None:
    """Picks t..budget-1 with one matrix-vector product over the pool per pick; d [n] is
    updated in place. Holds the pool's unit float32 rows when they fit in max_bytes."""
    n, dim = x.shape
    X = unit_rows(x, inv) if n * dim * 4 <= max_bytes else None  # [n, d] or block-wise
    prio = np.empty(n, np.float32)
    nd = np.empty(n, np.float32)
    dups = Dups(x, w)
    picked = np.zeros(n, bool)
    picked[tr.picks[:t]] = True
    while t < budget:
        if w is None:
            prio[:] = d
        else:
            np.multiply(w, d, out=prio)
        prio[tr.picks[:t]] = -np.inf
        i = int(np.argmax(prio))
        d_i = float(d[i])
        i = dups.resolve(i, picked.__getitem__, float(prio[i]))
        prio_i = d_i if w is None else float(w[i] * np.float32(d_i))
        picked[i] = True
        p = X[i].copy() if X is not None else unit_rows(x, inv, np.array([i]))[0]
        if X is not None:
            np.matmul(X, p, out=nd)
        else:
            for s in range(0, n, block):
                nd[s:s + block] = unit_rows(x, inv, slice(s, s + block)) @ p
        np.subtract(np.float32(1.0), nd, out=nd)
        np.maximum(nd, 0, out=nd)
        np.minimum(d, nd, out=d)
        d[i] = 0.0
        d[dups.copies(i)] = 0.0
        tr.put(t, i, prio_i, d_i, float(d.max()))
        t += 1
