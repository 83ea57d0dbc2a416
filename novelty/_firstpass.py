"""Exact nearest labeled row for every pool row, without the full pool x labeled product.

Two mechanisms, both exact on the unit float32 rows (see _rows):

1. Triangle-inequality pruning over clusters of the pool (_clusters). For pool cluster
   c (centroid mu, member x at ||x - mu|| = a_x) and labeled y at e_y = ||y - mu||,
   ||x - y|| >= e_y - a_x. e_y comes from one bf16 product of the centroids with the
   labeled rows, with its proven error taken off (a lower bound on e_y). Each member
   first gets an upper bound ub_x on its nearest distance from the k0 labeled rows
   nearest to mu; then y can only matter to x when e_y < a_x + ub_x (or a_x + the count
   radius). Members are sorted by that threshold and cut into tiers where the number of
   labeled rows it admits (estimated on a sample) grows 4-fold; a tier is multiplied in
   float32 against the labeled rows inside its threshold only, or, when that would cost
   more, sent to the screen. This settles rows near the labeled set.

2. A bfloat16 screen with a proven error window for the rows the bounds cannot help
   (far from every labeled row, or unclustered data): one bf16 GEMM (fp32 accumulate,
   bf16 output) against all labeled rows, then only the labeled rows whose screened
   similarity lies within the proven error of the row's best are recomputed in
   float32. The error of x~.y~ against x.y is at most |x~ - x| |y~| + |y~ - y| |x|
   (measured per row), plus float32 accumulation, plus the bf16 rounding of the output,
   which is made small by subtracting a per-row offset (an extra column) so that the
   values near the best are near zero.

Ties go to the lower labeled index, as in the plain search.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np

from ._clusters import PoolClusters, chunk_stats, cluster_chunks
from ._rows import BF16Side, bf16_mm, blas_threads, torch_threads, unit_rows

log = logging.getLogger(__name__)

Tick = Optional[Callable[[int], object]]  # told the number of pool rows just settled (a progress bar's update)

ETA = 2e-4  # slack on squared Euclidean distances obtained through dot products (float32 error)
U_BF16 = 2.0 ** -8  # unit roundoff of bfloat16 (8-bit significand)
PROBE = 512  # labeled rows sampled to estimate candidate counts when choosing tiers
FEW = 256  # candidates under which a cluster is settled in one product, without tiers
TOPK = 4  # screened candidates read per row before falling back to a full row scan
# rough costs on one core (ns): gathering a labeled row, a float32 pair in a small product,
# a pair in the bf16 screen (a large product, top-k and recomputation included)
GATHER_NS, PAIR_NS, SCREEN_PAIR_NS = 100.0, 10.0, 3.0


def dot_tol(d: int) -> float:
    """Worst-case float32 error of a d-term dot product of unit vectors (gamma_d)."""
    return d * 2.0 ** -24 * 1.01


def within(S: np.ndarray, radius: float) -> np.ndarray:
    """The one test for 'distance <= radius' on float32 similarities."""
    return (np.float32(1.0) - S) <= np.float32(radius)


class Results:
    """Best similarity, its labeled index and the radius count per pool row."""

    def __init__(self, n: int, with_count: bool, mult: np.ndarray | None = None):
        self.sim = np.full(n, -np.inf, np.float32)
        self.idx = np.full(n, -1, np.int64)
        self.count = np.zeros(n, np.int32) if with_count else None
        self.mult = mult  # [m] int32 copies of each (deduplicated) labeled row, or None

    def counts(self, hit: np.ndarray, cols: np.ndarray | None) -> np.ndarray:
        """hit [b, k] bool (labeled cols within the radius) -> labeled rows counted [b]."""
        if self.mult is None:
            return hit.sum(axis=1)
        return hit.astype(np.int32) @ (self.mult if cols is None else self.mult[cols])

    def put_block(self, rows, S: np.ndarray, cols: np.ndarray | None, radius: float | None):
        """Rows `rows` (pool indices) from a dense similarity block S [b, k] over labeled cols."""
        j = np.argmax(S, axis=1)  # first max: the lowest labeled index when cols ascend
        self.sim[rows] = S[np.arange(len(S)), j]
        self.idx[rows] = j if cols is None else cols[j]
        if self.count is not None:
            self.count[rows] = self.counts(within(S, radius), cols)


def nearest_plain(x: np.ndarray, inv: np.ndarray, Y: np.ndarray, radius: float | None, res: Results,
                  rows: np.ndarray | None = None, max_elems: int = 1 << 22, progress: Tick = None) -> None:
    """Chunked float32 product against all labeled rows: the reference. progress, when
    given, is called with the number of rows each block settles."""
    n = len(x) if rows is None else len(rows)
    step = max(64, min(8192, max_elems // max(1, len(Y))))
    for s in range(0, n, step):
        sel = slice(s, min(n, s + step)) if rows is None else rows[s:s + step]
        X = unit_rows(x, inv, sel)
        res.put_block(np.arange(s, min(n, s + step)) if rows is None else sel, X @ Y.T, None, radius)
        if progress is not None:
            progress(len(X))


class Screen:
    """bf16 screen of pool rows against all labeled rows (mechanism 2): one torch GEMM
    and a top-k per block; the bounds and the float32 recomputation in numpy."""

    def __init__(self, Y: np.ndarray, radius: float | None, res: Results):
        import torch

        self.torch, self.radius, self.res, self.Y = torch, radius, res, Y
        d = Y.shape[1]
        side = BF16Side(Y, -1.0)  # a pool row's offset column c times -1: products are x~.y~ - c
        self.dy_max, self.ny_max = float(side.dx.max()), float(side.nxb.max())
        self.Ya = side.bits  # bf16 bits [m, dp], with the offset column
        self.tol = dot_tol(d)
        self.screened = self.recomputed = 0

    def dot_upper(self, M: np.ndarray) -> np.ndarray:
        """Upper bounds [k, m] on M @ Y.T for rows M [k, d] (any norm), from one bf16 product:
        |m~.y~ - m.y| <= |m~ - m| |y~| + |m| |y~ - y| (+ accumulation), + the output rounding."""
        side = BF16Side(M, 0.0)  # offset 0: the products are m~.y~
        E = side.dx * self.ny_max + side.nx * self.dy_max + self.tol * side.nxb * self.ny_max + 1e-6
        U = U_BF16 / (1 - U_BF16)
        rounding = U * (1 + U) * side.nxb * self.ny_max  # |out| <= |m~| |y~| (1 + U); rounding <= U |out|
        out = bf16_mm(side.bits, self.Ya).float().numpy()  # [k, m]
        out += (E + rounding)[:, None]
        return out

    def run(self, X: np.ndarray, where: np.ndarray, s0: np.ndarray) -> None:
        """Rows X [b, d] (unit float32) of pool rows `where`; s0 [b]: an exact
        similarity each row is known to reach (a lower bound on its best). Fills res."""
        torch, b = self.torch, len(X)
        side = BF16Side(X, s0)  # offset: the known similarity, rounded
        dx, nx, nxb, cf = side.dx, side.nx, side.nxb, side.offset
        out = bf16_mm(side.bits, self.Ya)  # [b, m] bf16: x~.y~ - c, rounded
        k = min(TOPK, out.shape[1])
        top_v, top_i = torch.topk(out, k, dim=1)
        top_v, top_i = top_v.float().numpy().astype(np.float64), top_i.numpy()
        # |out - (x.y - c)| <= E + U |out| for every element
        E = dx * self.ny_max + self.dy_max * nx + self.tol * (nxb * self.ny_max + np.abs(cf)) + 1e-6
        U = U_BF16 / (1 - U_BF16)
        vmax = top_v[:, 0]
        best_lb = np.maximum(s0.astype(np.float64) - self.tol, cf + vmax - E - U * np.abs(vmax) - self.tol)
        lo = _lower(best_lb - cf - E, U)  # out >= lo: y may reach the best
        if self.radius is not None:
            lo = np.minimum(lo, _lower((1.0 - self.radius - 2 * self.tol) - cf - E, U))
        r, j = np.nonzero(top_v >= lo[:, None])
        cols = top_i[r, j]
        full = np.flatnonzero(top_v[:, -1] >= lo)  # rows that may have more than k candidates
        if len(full) and k < out.shape[1]:
            r2, c2 = np.nonzero(out[torch.from_numpy(full)].float().numpy() >= lo[full, None])
            drop = np.isin(r, full)
            r, cols = np.concatenate([r[~drop], full[r2]]), np.concatenate([cols[~drop], c2])
        o = np.lexsort((cols, r))  # by row, then labeled index
        r, cols = r[o], cols[o]
        S = np.empty(len(r), np.float32)
        for s in range(0, len(r), 8192):
            S[s:s + 8192] = np.einsum("ij,ij->i", X[r[s:s + 8192]], self.Y[cols[s:s + 8192]])
        self._merge(where, r, cols, S, b)
        self.screened += b
        self.recomputed += len(r)

    def _merge(self, where, r, cols, S, b) -> None:
        assert len(r) and np.array_equal(np.unique(r), np.arange(b)), "every screened row keeps its best"
        seg = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])  # first pair of each row
        smax = np.maximum.reduceat(S, seg)
        first = np.where(S == np.repeat(smax, np.diff(np.r_[seg, len(r)])), cols, np.iinfo(np.int64).max)
        self.res.sim[where] = smax
        self.res.idx[where] = np.minimum.reduceat(first, seg)
        if self.res.count is not None:
            w = within(S, self.radius).astype(np.int32)
            self.res.count[where] = np.add.reduceat(w if self.res.mult is None else w * self.res.mult[cols], seg)


def _lower(t, U):
    """The least v that may satisfy v + U|v| >= t (E already moved into t)."""
    return np.minimum(t / (1 + U), t / (1 - U))


def nearest_pruned(x: np.ndarray, inv: np.ndarray, Y: np.ndarray, cl: PoolClusters, radius: float | None,
                   res: Results, k0: int = 8, screen_all: bool = False, progress: Tick = None) -> dict:
    """Fill `res` for every pool row (mechanisms 1 and 2; screen_all: 2 only, for tests).
    progress: told the rows settled, n in all. -> counters for the log."""
    with blas_threads(1), torch_threads(1):  # one thread but for the large products (bf16_mm)
        screen = Screen(Y, radius, res)
        far, s0, pairs = _tiers(x, inv, Y, cl, radius, res, k0, screen_all, screen, progress)
        for s in range(0, len(far), 512):
            rows = cl.perm[far[s:s + 512]]
            screen.run(unit_rows(x, inv, rows), rows, s0[s:s + 512])
            if progress is not None:
                progress(len(rows))
    n, m = len(x), len(Y)
    stats = {"pruned_pairs_share": pairs / max(1, n * m), "screened_rows_share": screen.screened / max(1, n),
             "recomputed_per_screened_row": screen.recomputed / max(1, screen.screened)}
    log.debug("nearest-labeled pruned: %s", stats)
    return stats


def _tiers(x, inv, Y, cl: PoolClusters, radius, res: Results, k0: int, screen_all: bool, screen: Screen,
           progress: Tick = None):
    """Mechanism 1. -> (positions left for the screen, their known similarity, pairs computed)."""
    import torch

    m, d = Y.shape
    k0 = min(k0, m)
    y2 = np.einsum("ij,ij->i", Y, Y)
    r2 = 2 * radius + ETA if radius is not None else 0.0
    far, far_s0 = [], []
    pairs = 0
    have_stats = cl.mu is not None
    probe = np.sort(np.random.default_rng(0).choice(m, min(m, PROBE), replace=False))
    for c0, c1 in cluster_chunks(cl.starts, 8192):
        s0, s1 = cl.starts[c0], cl.starts[c1]
        to_screen = 0
        X = unit_rows(x, inv, cl.perm[s0:s1])  # [b, d]
        if not have_stats:
            chunk_stats(cl, c0, c1, X)
        Elo = screen.dot_upper(cl.mu[c0:c1])  # [kc, m] >= mu . y
        Elo *= -2
        Elo += y2
        Elo += (cl.mu2[c0:c1] - ETA)[:, None]
        np.sqrt(np.maximum(Elo, 0, out=Elo), out=Elo)  # <= ||mu - y||
        near = np.sort(torch.topk(torch.from_numpy(Elo), k0, dim=1, largest=False).indices.numpy(), axis=1)
        # per cluster, e of a fixed sample of the labeled rows, sorted: estimates how many
        # labeled rows a threshold keeps (only to choose tiers; the candidates are exact)
        es = np.sort(Elo[:, probe], axis=1)
        for c in range(c0, c1):
            lo, hi = cl.starts[c] - s0, cl.starts[c + 1] - s0
            Xc, e = X[lo:hi], Elo[c - c0]
            best0 = (Xc @ Y[near[c - c0]].T).max(axis=1)  # [nc]
            ub2 = np.maximum(np.maximum(2 - 2 * best0, 0) + ETA, r2)
            t = cl.a[s0 + lo:s0 + hi] + np.sqrt(ub2)  # y with e_y >= t cannot matter to x
            tmax = t.max()
            if not screen_all and np.searchsorted(es[c - c0], tmax) * (m / len(probe)) < FEW:
                cand = np.flatnonzero(e < tmax)  # few candidates for every member: one product
                if len(cand) < 2 * FEW:
                    res.put_block(cl.perm[s0 + lo:s0 + hi], Xc @ Y[cand].T, cand, radius)
                    pairs += len(Xc) * len(cand)
                    continue
            # tiers: members sorted by t, cut where the candidate count grows 4-fold, so near
            # members do not pay for far ones; each tier goes to float32 on its candidates
            # (a gather, then a small product) or to the bf16 screen, whichever costs less
            o = np.argsort(t, kind="stable")
            ts = t[o]
            cnt = np.searchsorted(es[c - c0], ts) * (m / len(probe)) + 1
            cuts = np.r_[0, np.flatnonzero(np.diff(np.floor(np.log2(cnt + 1.0) / 2))) + 1, len(o)]
            size = np.diff(cuts)
            exact = cnt[cuts[1:] - 1] * (GATHER_NS + size * PAIR_NS) <= size * m * SCREEN_PAIR_NS
            if screen_all:
                exact[:] = False
            if exact.any():
                last = cuts[1:][exact][-1] - 1
                pool_c = np.flatnonzero(e < ts[last])  # candidates of the widest exact tier
                e_c = e[pool_c]
            for j in range(len(size)):
                mem = np.sort(o[cuts[j]:cuts[j + 1]])
                if exact[j]:
                    cand = pool_c[e_c < ts[cuts[j + 1] - 1]]  # ascending labeled indices
                    res.put_block(cl.perm[s0 + lo + mem], Xc[mem] @ Y[cand].T, cand, radius)
                    pairs += len(mem) * len(cand)
                else:
                    far.append(s0 + lo + mem)
                    far_s0.append(best0[mem])
                    to_screen += len(mem)
        if progress is not None:  # rows left to the screen are told when it settles them
            progress(int(s1 - s0) - to_screen)
    far = np.concatenate(far) if far else np.zeros(0, np.int64)
    o = np.argsort(far)
    s0 = np.concatenate(far_s0).astype(np.float32) if far_s0 else np.zeros(0, np.float32)
    return far[o], s0[o], pairs
