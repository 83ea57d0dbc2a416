"""Exact nearest labeled row for every pool row, without the full pool x labeled product.

Two mechanisms, both exact on the unit float32 rows (see _rows):

1. Triangle-inequality pruning over clusters of the pool (_clusters). For pool cluster
   c (centroid mu, member x at ||x - mu|| = a_x) and labeled y at e_y = ||y - mu||,
   ||x - y|| >= e_y - a_x. Each member first gets an upper bound ub_x on its nearest
   distance from the k0 labeled rows nearest to mu; then y can only matter to x when
   e_y < a_x + ub_x (or a_x + the count radius). Members are split into tiers by that
   threshold and each tier is multiplied, in float32, against the labeled rows inside
   its threshold only. This settles rows near the labeled set.

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

import numpy as np

from ._clusters import PoolClusters, cluster_chunks
from ._rows import torch_threads, unit_rows

log = logging.getLogger(__name__)

ETA = 2e-4  # slack on squared Euclidean distances obtained through dot products (float32 error)
U_BF16 = 2.0 ** -8  # unit roundoff of bfloat16 (8-bit significand)
TIERS = (0.5, 0.8, 0.95, 1.0)  # member quantiles of the threshold that split a cluster into tiers
TOPK = 16  # screened candidates read per row before falling back to a full row scan


def dot_tol(d: int) -> float:
    """Worst-case float32 error of a d-term dot product of unit vectors (gamma_d)."""
    return d * 2.0 ** -24 * 1.01


def within(S: np.ndarray, radius: float) -> np.ndarray:
    """The one test for 'distance <= radius' on float32 similarities."""
    return (np.float32(1.0) - S) <= np.float32(radius)


class Results:
    """Best similarity, its labeled index and the radius count per pool row."""

    def __init__(self, n: int, with_count: bool):
        self.sim = np.full(n, -np.inf, np.float32)
        self.idx = np.full(n, -1, np.int64)
        self.count = np.zeros(n, np.int32) if with_count else None

    def put_block(self, rows, S: np.ndarray, cols: np.ndarray | None, radius: float | None):
        """Rows `rows` (pool indices) from a dense similarity block S [b, k] over labeled cols."""
        j = np.argmax(S, axis=1)  # first max: the lowest labeled index when cols ascend
        self.sim[rows] = S[np.arange(len(S)), j]
        self.idx[rows] = j if cols is None else cols[j]
        if self.count is not None:
            self.count[rows] = within(S, radius).sum(axis=1)


def nearest_plain(x: np.ndarray, inv: np.ndarray, Y: np.ndarray, radius: float | None, res: Results,
                  rows: np.ndarray | None = None, max_elems: int = 1 << 25) -> None:
    """Chunked float32 product against all labeled rows: the reference."""
    n = len(x) if rows is None else len(rows)
    step = max(64, min(8192, max_elems // max(1, len(Y))))
    for s in range(0, n, step):
        sel = slice(s, min(n, s + step)) if rows is None else rows[s:s + step]
        X = unit_rows(x, inv, sel)
        res.put_block(np.arange(s, min(n, s + step)) if rows is None else sel, X @ Y.T, None, radius)


class Screen:
    """bf16 screen of pool rows against all labeled rows (mechanism 2). Torch only."""

    def __init__(self, Y: np.ndarray, radius: float | None, res: Results):
        import torch

        self.torch, self.radius, self.res = torch, radius, res
        m, d = Y.shape
        self.d, self.dp = d, (d + 1 + 15) // 16 * 16  # room for the offset column, padded
        self.Y = torch.from_numpy(Y)
        Yb = self.Y.to(torch.bfloat16)
        self.dy_max = float((Yb.float() - self.Y).norm(dim=1).max())
        self.ny_max = float(Yb.float().norm(dim=1).max())
        self.Ya = torch.zeros(m, self.dp, dtype=torch.bfloat16)
        self.Ya[:, :d] = Yb
        self.Ya[:, d] = -1.0
        self.tol = dot_tol(d)
        self.screened = self.recomputed = 0

    def run(self, X: np.ndarray, where: np.ndarray, s0: np.ndarray) -> None:
        """Rows X [b, d] (unit float32) of pool rows `where`; s0 [b]: an exact similarity
        each row is known to reach (a lower bound on its best). Fills res for them."""
        torch, d = self.torch, self.d
        Xt = torch.from_numpy(X)
        Xb = Xt.to(torch.bfloat16)
        dx = (Xb.float() - Xt).norm(dim=1)
        c = torch.from_numpy(s0).to(torch.bfloat16)  # offset: the known similarity, rounded
        cf = c.float()
        Xa = torch.zeros(len(X), self.dp, dtype=torch.bfloat16)
        Xa[:, :d] = Xb
        Xa[:, d] = c
        out = Xa @ self.Ya.T  # [b, m] bf16: x~.y~ - c, rounded
        # |out - (x.y - c)| <= E + U |out| for every element
        E = (dx * self.ny_max + self.dy_max * Xt.norm(dim=1)
             + self.tol * (Xb.float().norm(dim=1) * self.ny_max + cf.abs()) + 1e-6)
        U = U_BF16 / (1 - U_BF16)
        k = min(TOPK, out.shape[1])
        top_v, top_i = torch.topk(out, k, dim=1)
        vmax = top_v[:, 0].float()
        best_lb = torch.maximum(torch.from_numpy(s0) - self.tol, cf + vmax - E - U * vmax.abs() - self.tol)
        lo = _lower(best_lb - cf - E, U)  # out >= lo: y may reach the best
        if self.radius is not None:
            lo = torch.minimum(lo, _lower((1.0 - self.radius - 2 * self.tol) - cf - E, U))
        r, j = (top_v.float() >= lo[:, None]).nonzero(as_tuple=True)
        cols = top_i[r, j]
        full = (top_v[:, -1].float() >= lo).nonzero(as_tuple=True)[0]  # may hold more than k
        if len(full) and k < out.shape[1]:
            r2, c2 = (out[full].float() >= lo[full, None]).nonzero(as_tuple=True)
            drop = torch.isin(r, full)
            r, cols = torch.cat([r[~drop], full[r2]]), torch.cat([cols[~drop], c2])
        o = torch.argsort(r * out.shape[1] + cols)  # by row, then labeled index
        r, cols = r[o], cols[o]
        S = torch.empty(len(r))
        for s in range(0, len(r), 8192):
            S[s:s + 8192] = (Xt[r[s:s + 8192]] * self.Y[cols[s:s + 8192]]).sum(dim=1)
        self._merge(where, r.numpy(), cols.numpy(), S.numpy(), len(X))
        self.screened += len(X)
        self.recomputed += len(r)

    def _merge(self, where, r, cols, S, b) -> None:
        assert len(r) and np.array_equal(np.unique(r), np.arange(b)), "every screened row keeps its best"
        seg = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])  # first pair of each row
        smax = np.maximum.reduceat(S, seg)
        first = np.where(S == np.repeat(smax, np.diff(np.r_[seg, len(r)])), cols, np.iinfo(np.int64).max)
        self.res.sim[where] = smax
        self.res.idx[where] = np.minimum.reduceat(first, seg)
        if self.res.count is not None:
            self.res.count[where] = np.add.reduceat(within(S, self.radius).astype(np.int32), seg)


def _lower(t, U):
    """The least v that may satisfy v + U|v| >= t (E already moved into t)."""
    import torch

    return torch.minimum(t / (1 + U), t / (1 - U))


def nearest_pruned(x: np.ndarray, inv: np.ndarray, Y: np.ndarray, cl: PoolClusters, radius: float | None,
                   res: Results, k0: int = 8, screen_share: float = 0.4) -> dict:
    """Fill `res` for every pool row (mechanisms 1 and 2). -> counters for the log."""
    with torch_threads(1):  # numpy products, torch casts
        far, s0, pairs = _tiers(x, inv, Y, cl, radius, res, k0, screen_share)
    with torch_threads(None):  # torch only
        screen = Screen(Y, radius, res)
        for s in range(0, len(far), 512):
            rows = cl.perm[far[s:s + 512]]
            screen.run(unit_rows(x, inv, rows), rows, s0[s:s + 512])
    n, m = len(x), len(Y)
    stats = {"pruned_pairs_share": pairs / max(1, n * m), "screened_rows_share": screen.screened / max(1, n),
             "recomputed_per_screened_row": screen.recomputed / max(1, screen.screened)}
    log.debug("nearest-labeled pruned: %s", stats)
    return stats


def _tiers(x, inv, Y, cl: PoolClusters, radius, res: Results, k0: int, screen_share: float):
    """Mechanism 1. -> (positions left for the screen, their known similarity, pairs computed)."""
    m, d = Y.shape
    k0 = min(k0, m)
    y2 = np.einsum("ij,ij->i", Y, Y)
    r2 = 2 * radius + ETA if radius is not None else 0.0
    far, far_s0 = [], []
    pairs = 0
    for c0, c1 in cluster_chunks(cl.starts, 8192):
        s0, s1 = cl.starts[c0], cl.starts[c1]
        X = unit_rows(x, inv, cl.perm[s0:s1])  # [b, d]
        E2 = cl.mu2[c0:c1, None] + y2[None, :] - 2 * (cl.mu[c0:c1] @ Y.T)  # [kc, m]
        Elo = np.sqrt(np.maximum(E2 - ETA, 0))
        near = np.argpartition(Elo, k0 - 1, axis=1)[:, :k0] if k0 < m else np.broadcast_to(np.arange(m), (c1 - c0, m))
        near = np.sort(near, axis=1)
        for c in range(c0, c1):
            lo, hi = cl.starts[c] - s0, cl.starts[c + 1] - s0
            Xc, e = X[lo:hi], Elo[c - c0]
            best0 = (Xc @ Y[near[c - c0]].T).max(axis=1)  # [nc]
            ub2 = np.maximum(np.maximum(2 - 2 * best0, 0) + ETA, r2)
            t = cl.a[s0 + lo:s0 + hi] + np.sqrt(ub2)  # y with e_y >= t cannot matter to x
            o = np.argsort(t, kind="stable")
            prev = 0
            for q in TIERS:
                cut = max(prev + 1, int(np.ceil(q * len(o))))
                if cut > len(o) or prev >= len(o):
                    break
                mem = np.sort(o[prev:cut])
                prev = cut
                cand = np.flatnonzero(e < t[o[cut - 1]])  # ascending labeled indices
                if len(cand) > screen_share * m:
                    far.append(s0 + lo + mem)
                    far_s0.append(best0[mem])
                else:
                    res.put_block(cl.perm[s0 + lo + mem], Xc[mem] @ Y[cand].T, cand, radius)
                    pairs += len(mem) * len(cand)
    far = np.concatenate(far) if far else np.zeros(0, np.int64)
    o = np.argsort(far)
    s0 = np.concatenate(far_s0).astype(np.float32) if far_s0 else np.zeros(0, np.float32)
    return far[o], s0[o], pairs
