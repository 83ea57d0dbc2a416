"""Exact k-center greedy that touches only rows whose distance can matter.

State, per pool row, in cluster order (_clusters): d (distance to the nearest center
applied so far), the priority w*d, and how many picks have been applied to it. A row's
d only falls as centers are added, so a stale d is an upper bound. Per cluster we keep
the max priority and the max d over its rows, stale or not, and where they sit.

Each step looks at the cluster with the largest priority. If its best row is up to
date, that row is the exact argmax (every other row's true priority is at most its
stale one); otherwise the cluster is refreshed and the search repeats. A refresh brings
up to date only the rows whose stale priority reaches the second-largest cluster
maximum (the others cannot win this step), and applies to them only the pending picks
p that pass the triangle test: ||x - p|| >= ||mu_c - p|| - r_c, so p cannot lower any
d below (||mu_c - p|| - r_c)^2 / 2, and is skipped when that is >= the rows' largest d.
The surviving pairs go through one float32 GEMM. The covering radius after each pick
is found the same way on d instead of w*d. Ties go to the lower pool index: within a
cluster rows are in pool order, and between clusters the lower best row wins.

When the work done exceeds `give_up` times what the plain loop would have done (data
with no cluster structure), the caller finishes with the plain loop (`exact_d`).
"""
from __future__ import annotations

import numpy as np

from ._clusters import PoolClusters
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
        self.perm, self.starts = cl.perm, cl.starts
        self.dp = np.ascontiguousarray(d0[cl.perm], dtype=np.float32)  # [n] by position
        self.wp = None if w is None else np.ascontiguousarray(w[cl.perm], dtype=np.float32)
        self.pp = self.dp.copy() if w is None else self.wp * self.dp
        t0 = 0 if centers is None else len(centers)
        self.P = np.empty((max(budget, 1), dim), np.float32)  # unit rows of the picks
        self.P2 = np.empty(max(budget, 1), np.float32)  # their squared norms
        if t0:
            self.P[:t0] = centers
            self.P2[:t0] = np.einsum("ij,ij->i", centers, centers)
        self.t = t0
        self.applied = np.full(n, t0, np.int32)
        self.sizes = cl.sizes
        self.pmax, self.parg = self._seg_max(self.pp)
        self.dmax, self.darg = self._seg_max(self.dp)
        # picks already tested against cluster c's bound, and those that passed (with the bound)
        self.checked = np.full(cl.k, t0, np.int64)
        self.live = [np.zeros(0, np.int64)] * cl.k
        self.live_lb = [np.zeros(0, np.float32)] * cl.k
        self.work = 0  # row x pick distances computed
        self.refreshes = 0

    def _seg_max(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per cluster: max of v and the first position holding it."""
        vmax = np.maximum.reduceat(v, self.starts[:-1])
        pos = np.arange(len(v))
        first = np.where(v == np.repeat(vmax, self.sizes), pos, len(v))
        return vmax, np.minimum.reduceat(first, self.starts[:-1])

    def _recount(self, c: int) -> None:
        s0, s1 = self.starts[c], self.starts[c + 1]
        j = int(np.argmax(self.pp[s0:s1]))
        self.pmax[c], self.parg[c] = self.pp[s0 + j], s0 + j
        j = int(np.argmax(self.dp[s0:s1]))
        self.dmax[c], self.darg[c] = self.dp[s0 + j], s0 + j

    def top(self, by_priority: bool = True) -> int:
        """The position of the exact argmax of w*d (or of d), refreshing clusters as needed."""
        vmax, varg, vals = (self.pmax, self.parg, self.pp) if by_priority else (self.dmax, self.darg, self.dp)
        while True:
            best = vmax.max()
            cs = np.flatnonzero(vmax == best)
            c = int(cs[0]) if len(cs) == 1 else int(cs[np.argmin(self.perm[varg[cs]])])
            i = int(varg[c])
            if self.applied[i] >= self.t:
                return i
            # refresh every stale row that could win within the next few steps: those
            # reaching the `ahead`-th largest cluster maximum (at least the runner-up's)
            if len(vmax) > 1:
                keep, vmax[c] = vmax[c], -np.inf
                k = len(vmax) - min(self.ahead, len(vmax) - 1)
                floor = np.partition(vmax, k)[k]
                vmax[c] = keep
            else:
                floor = -np.inf
            self._refresh(c, vals, floor)

    def _refresh(self, c: int, vals: np.ndarray, floor: float) -> None:
        """Apply the pending picks to the rows of cluster c whose value reaches `floor`."""
        cl, t = self.cl, self.t
        s0, s1 = self.starts[c], self.starts[c + 1]
        sel = s0 + np.flatnonzero((vals[s0:s1] >= floor) & (self.applied[s0:s1] < t))
        self.refreshes += 1
        if len(sel):
            live, live_lb = self._live(c)
            since = self.applied[sel]
            u0 = since.min()
            groups = [(u0, sel)] if u0 == since.max() else [(u, sel[since == u]) for u in np.unique(since)]
            for u, g in groups:
                d = self.dp[g]
                use = live[(live >= u) & (live_lb < d.max())] if len(live) else live
                if len(use):
                    X = unit_rows(self.x, self.inv, self.perm[g])  # [b, dim]
                    S = X @ self.P[use].T  # [b, k]
                    d = np.minimum(d, np.maximum(np.float32(1.0) - S.max(axis=1), np.float32(0.0)))
                    self.dp[g] = d
                    self.pp[g] = d if self.wp is None else self.wp[g] * d
                    self.work += len(g) * len(use)
                self.applied[g] = t
        self._recount(c)

    def _live(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Picks that may still lower a distance in cluster c: p is dropped once the
        bound (||mu_c - p|| - r_c)^2 / 2 reaches the cluster's max d (which only falls)."""
        cl, t = self.cl, self.t
        dmax = self.dmax[c]
        live, lb = self.live[c], self.live_lb[c]
        keep = lb < dmax
        if self.checked[c] < t:
            new = np.arange(self.checked[c], t)
            q2 = cl.mu2[c] + self.P2[new] - 2 * (self.P[new] @ cl.mu[c])
            e = np.maximum(np.sqrt(np.maximum(q2 - ETA, 0)) - cl.r[c], 0)
            nlb = 0.5 * e * e
            ok = nlb < dmax
            live, lb = np.concatenate([live[keep], new[ok]]), np.concatenate([lb[keep], nlb[ok]])
            self.checked[c] = t
        elif not keep.all():
            live, lb = live[keep], lb[keep]
        self.live[c], self.live_lb[c] = live, lb
        return live, lb

    def pick(self, i: int) -> tuple[int, float, float]:
        """Make position i a center. -> (pool row, priority, d) at pick time."""
        row, prio, d = int(self.perm[i]), float(self.pp[i]), float(self.dp[i])
        p = unit_rows(self.x, self.inv, np.array([row]))[0]
        self.P[self.t], self.P2[self.t] = p, p @ p
        self.pp[i], self.dp[i], self.applied[i] = -np.inf, 0.0, DONE
        self.t += 1
        self._recount(int(np.searchsorted(self.starts, i, side="right") - 1))
        return row, prio, d

    def exact_d(self) -> np.ndarray:
        """Bring every row up to date; -> d [n] in pool order (picked rows: 0)."""
        for c in range(self.cl.k):
            self._refresh(c, self.dp, -np.inf)
        d = np.empty_like(self.dp)
        d[self.perm] = self.dp
        return d
