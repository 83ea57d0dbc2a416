"""Exact k-center greedy that touches only rows whose distance can matter.

State, per pool row, in cluster order (_clusters): d (distance to the nearest center
applied so far), the priority w*d, and how many picks have been applied to it. A row's
d only falls as centers are added, so a stale d is an upper bound. Per cluster we keep
the max priority and the max d over its rows, stale or not, and where they sit.

Each step looks at the cluster with the largest priority. If its best row is up to
date, that row is the exact argmax (every other row's true priority is at most its
stale one). Otherwise the clusters whose maximum reaches the `ahead`-th largest are
refreshed together: their stale rows at or above that value get the pending picks, and
the search repeats. Of the pending picks, only those that pass the triangle test are
applied: ||x - p|| >= ||mu_c - p|| - r_c, so p cannot lower any d of cluster c below
lb(c, p) = (||mu_c - p|| - r_c)^2 / 2; p is skipped when lb(c, p) >= the largest d
being refreshed there; a row is skipped when its d is at most every remaining bound.
lb(., p) is computed for every cluster once per pick (a [K, d] product, kept as a
[K, budget] table); the surviving rows x picks go through one float32 GEMM. The
covering radius after each pick is found the same way on d instead of w*d. Ties go to
the lower pool index: within a cluster rows are in pool order, and between clusters
the lower best row wins.
"""
from __future__ import annotations

import numpy as np

from ._clusters import PoolClusters, cluster_chunks
from ._firstpass import ETA
from ._rows import unit_rows

DONE = np.iinfo(np.int32).max  # `applied` of a picked row: never stale


class LazyGreedy:
    def __init__(self, x: np.ndarray, inv: np.ndarray, cl: PoolClusters, d0: np.ndarray,
                 w: np.ndarray | None, budget: int, centers: np.ndarray | None = None, ahead: int = 16):
        """d0 [n] in pool order (exact w.r.t. the centers so far); centers [t, d] unit rows
        of picks already applied to every row (the no-labeled first pick)."""
        self.x, self.inv, self.cl, self.ahead = x, inv, cl, ahead
        n, dim = x.shape
        self.perm, self.starts, self.sizes = cl.perm, cl.starts, cl.sizes
        self.dp = np.ascontiguousarray(d0[cl.perm], dtype=np.float32)  # [n] by position
        self.wp = None if w is None else np.ascontiguousarray(w[cl.perm], dtype=np.float32)
        self.pp = self.dp.copy() if w is None else self.wp * self.dp
        t0 = 0 if centers is None else len(centers)
        B = max(budget, 1)
        self.P = np.zeros((B, dim), np.float32)  # unit rows of the picks
        self.LB = np.zeros((cl.k, B), np.float32)  # lb(c, p) per cluster and pick
        self.t = t0
        self.applied = np.full(n, t0, np.int32)
        self.pmax, self.parg = self._seg_max(self.pp, np.arange(cl.k))
        self.dmax, self.darg = self._seg_max(self.dp, np.arange(cl.k))
        self.work = 0  # row x pick distances computed
        self.refreshes = 0

    def _members(self, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of the rows of clusters C (ascending C) and each one's cluster slot."""
        sizes = self.sizes[C]
        slot = np.repeat(np.arange(len(C)), sizes)
        pos = np.arange(slot.size) + np.repeat(self.starts[C] - np.r_[0, np.cumsum(sizes)[:-1]], sizes)
        return pos, slot

    def _seg_max(self, v: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per cluster of C: max of v over its rows and the first position holding it."""
        pos, slot = self._members(C)
        heads = np.r_[0, np.cumsum(self.sizes[C])[:-1]]
        vv = v[pos]
        vmax = np.maximum.reduceat(vv, heads)
        first = np.where(vv == vmax[slot], pos, len(v))
        return vmax, np.minimum.reduceat(first, heads)

    def top(self, by_priority: bool = True) -> int:
        """The position of the exact argmax of w*d (or of d), refreshing clusters as needed."""
        vmax, varg, vals = (self.pmax, self.parg, self.pp) if by_priority else (self.dmax, self.darg, self.dp)
        K = len(vmax)
        while True:
            best = vmax.max()
            cs = np.flatnonzero(vmax == best)
            c = int(cs[0]) if len(cs) == 1 else int(cs[np.argmin(self.perm[varg[cs]])])
            i = int(varg[c])
            if self.applied[i] >= self.t:
                return i
            k = K - min(self.ahead, K)
            floor = np.partition(vmax, k)[k]  # the ahead-th largest cluster maximum
            self.refresh(np.flatnonzero((vmax >= floor) & (self.applied[varg] < self.t)), vals, floor)

    def refresh(self, C: np.ndarray, vals: np.ndarray, floor: float) -> None:
        """Apply the pending picks to the stale rows of clusters C whose value reaches floor."""
        t = self.t
        self.refreshes += 1
        pos, slot = self._members(C)
        keep = (vals[pos] >= floor) & (self.applied[pos] < t)
        R, slot = pos[keep], slot[keep]
        if len(R):
            u = self.applied[R]
            u0 = int(u.min())
            dR = self.dp[R]
            # per cluster: the earliest pick not yet applied and the largest d to refresh
            first = np.full(len(C), t, np.int64)
            np.minimum.at(first, slot, u)
            dsel = np.zeros(len(C), np.float32)
            np.maximum.at(dsel, slot, dR)
            L = self.LB[C, u0:t]  # [|C|, k]
            live = (L < dsel[:, None]) & (np.arange(u0, t) >= first[:, None])
            J = u0 + np.flatnonzero(live.any(axis=0))  # picks that may lower some row
            if len(J):  # rows at or below every live bound of their cluster cannot change
                Lmin = np.where(live, L, np.inf).min(axis=1)  # [|C|]
                can = dR > Lmin[slot]
                self.applied[R[~can]] = t
                R, dR = R[can], dR[can]
            if len(J) and len(R):
                X = unit_rows(self.x, self.inv, self.perm[R])  # [r, dim]
                S = X @ self.P[J].T  # [r, |J|]
                dR = np.minimum(dR, np.maximum(np.float32(1.0) - S.max(axis=1), np.float32(0.0)))
                self.dp[R] = dR
                self.pp[R] = dR if self.wp is None else self.wp[R] * dR
                self.work += len(R) * len(J)
            self.applied[R] = t
        self.pmax[C], self.parg[C] = self._seg_max(self.pp, C)
        self.dmax[C], self.darg[C] = self._seg_max(self.dp, C)

    def pick(self, i: int, d_at: float | None = None) -> tuple[int, float, float]:
        """Make position i a center. -> (pool row, priority, d) at pick time; d_at: its d
        when known better than the row's own (an identical row's, up to date)."""
        cl = self.cl
        row, prio, d = int(self.perm[i]), float(self.pp[i]), float(self.dp[i])
        if d_at is not None:
            d = d_at
            prio = d if self.wp is None else float(self.wp[i] * np.float32(d))
        p = unit_rows(self.x, self.inv, np.array([row]))[0]
        t = self.t
        self.P[t] = p
        q2 = cl.mu2 + p @ p - 2 * (cl.mu @ p)
        e = np.maximum(np.sqrt(np.maximum(q2 - ETA, 0)) - cl.r, 0)
        self.LB[:, t] = 0.5 * e * e
        self.pp[i], self.dp[i], self.applied[i] = -np.inf, 0.0, DONE
        self.t += 1
        c = np.array([np.searchsorted(self.starts, i, side="right") - 1])
        self.pmax[c], self.parg[c] = self._seg_max(self.pp, c)
        self.dmax[c], self.darg[c] = self._seg_max(self.dp, c)
        return row, prio, d

    def done(self, row: int) -> None:
        """Pool row `row` was picked before this loop (the first pick without labeled rows,
        whose distances are in d0): never a candidate again. Left as it was, its priority
        0 tied with every covered row, and it was picked a second time once all was covered."""
        i = int(np.flatnonzero(self.perm == row)[0])
        self.pp[i], self.dp[i], self.applied[i] = -np.inf, 0.0, DONE
        c = np.array([np.searchsorted(self.starts, i, side="right") - 1])
        self.pmax[c], self.parg[c] = self._seg_max(self.pp, c)
        self.dmax[c], self.darg[c] = self._seg_max(self.dp, c)

    def cover(self, positions: np.ndarray) -> None:
        """Rows known to be at distance 0 from the last pick (identical to it): d and
        priority 0 now, and their clusters' maxima again."""
        live = positions[self.applied[positions] != DONE]
        if not len(live):
            return
        self.dp[live], self.pp[live] = 0.0, 0.0
        c = np.unique(np.searchsorted(self.starts, live, side="right") - 1)
        self.pmax[c], self.parg[c] = self._seg_max(self.pp, c)
        self.dmax[c], self.darg[c] = self._seg_max(self.dp, c)

    def exact_d(self) -> np.ndarray:
        """Bring every row up to date; -> d [n] in pool order (picked rows: 0)."""
        for c0, c1 in cluster_chunks(self.starts, 4096):
            self.refresh(np.arange(c0, c1), self.dp, -np.inf)
        d = np.empty_like(self.dp)
        d[self.perm] = self.dp
        return d
