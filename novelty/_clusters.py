"""Clusters of the pool for triangle-inequality bounds: centroid, member radii, order.

Any assignment of rows to clusters gives valid bounds, because each cluster's
centroid and radius are computed afterwards, exactly, from its members: for a row x
of cluster c and any y, ||x - y|| >= ||mu_c - y|| - ||x - mu_c|| >= ||mu_c - y|| - r_c.
So the clustering only decides how tight the bounds are, and is made cheap: a
two-level k-means (coarse cells, then clusters inside each cell) trained on samples,
each row assigned in float32 to the nearest centroid of its own cell.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ._rows import BLOCK, unit_rows

log = logging.getLogger(__name__)

ROUND_UP = 1e-5  # added to every radius: covers float32 error in ||x - mu||


@dataclass
class PoolClusters:
    perm: np.ndarray  # [n] int64: the pool row at each position; a cluster's members are contiguous, ascending
    starts: np.ndarray  # [K + 1] int64: cluster c holds positions starts[c]:starts[c + 1]
    mu: np.ndarray  # [K, d] float32: mean of the members' unit rows
    mu2: np.ndarray  # [K] float32: ||mu||^2
    a: np.ndarray  # [n] float32: ||x - mu|| of the row at each position, rounded up
    r: np.ndarray  # [K] float32: max of a over the members

    @property
    def k(self) -> int:
        return len(self.starts) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.starts)


def _lloyd(X: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """k centroids [k, d] float32 of the rows X [s, d]: Lloyd from k random rows (numpy
    only: OpenMP libraries here would fight numpy's BLAS threads for the cores)."""
    k = min(k, len(X))
    C = X[np.sort(rng.choice(len(X), k, replace=False))].copy()
    for _ in range(iters):
        lab = _assign(X, C)
        onehot = (lab[None, :] == np.arange(k)[:, None]).astype(np.float32)  # [k, s]
        cnt = onehot.sum(axis=1)
        nz = cnt > 0  # an empty cluster keeps its centroid
        C[nz] = (onehot[nz] @ X) / cnt[nz, None]
    return C


def _assign(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    """[b] int64: the nearest centroid (Euclidean) of each row of X [b, d]."""
    half = 0.5 * np.einsum("ij,ij->i", C, C)  # [k]
    return np.argmax(X @ C.T - half, axis=1)


def _sample(rng: np.random.Generator, idx: np.ndarray, cap: int) -> np.ndarray:
    return idx if len(idx) <= cap else np.sort(rng.choice(idx, cap, replace=False))


def cluster_pool(x: np.ndarray, inv: np.ndarray, size: int = 256, iters: int = 6, seed: int = 0) -> PoolClusters:
    """Cluster the rows of x ([n, d], inv from row_inv_norms) into about n / size clusters."""
    n, d = x.shape
    rng = np.random.default_rng(seed)
    k = max(1, round(n / size))
    k1 = max(1, min(k, math.ceil(math.sqrt(k))))
    # coarse cells
    C1 = _lloyd(unit_rows(x, inv, _sample(rng, np.arange(n), 64 * k1)), k1, iters, rng)
    cell = np.empty(n, np.int64)
    for s in range(0, n, BLOCK):
        cell[s:s + BLOCK] = _assign(unit_rows(x, inv, slice(s, s + BLOCK)), C1)
    # clusters inside each cell
    label = np.empty(n, np.int64)
    order = np.argsort(cell, kind="stable")
    bounds = np.searchsorted(cell[order], np.arange(len(C1) + 1))
    offset = 0
    for j in range(len(C1)):
        idx = order[bounds[j]:bounds[j + 1]]  # ascending pool rows
        if len(idx) == 0:
            continue
        kj = max(1, round(len(idx) / size))
        if kj == 1:
            label[idx] = offset
        else:
            C = _lloyd(unit_rows(x, inv, _sample(rng, idx, 32 * kj)), kj, iters, rng)
            for s in range(0, len(idx), BLOCK):
                part = idx[s:s + BLOCK]
                label[part] = offset + _assign(unit_rows(x, inv, part), C)
        offset += kj
    # compact labels, order positions by (cluster, pool row)
    used, label = np.unique(label, return_inverse=True)
    perm = np.argsort(label, kind="stable")
    sizes = np.bincount(label, minlength=len(used))
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    mu, a = _member_stats(x, inv, perm, starts)
    r = np.zeros(len(sizes), np.float32)
    np.maximum.at(r, np.repeat(np.arange(len(sizes)), sizes), a)
    log.debug("pool clusters: %d (sizes %d..%d), radius median %.3f max %.3f",
              len(sizes), sizes.min(), sizes.max(), float(np.median(r)), float(r.max()))
    return PoolClusters(perm, starts, mu, np.einsum("ij,ij->i", mu, mu), a, r)


def cluster_chunks(starts: np.ndarray, rows: int = BLOCK):
    """(c0, c1): runs of whole clusters holding about `rows` positions each."""
    K = len(starts) - 1
    c0 = 0
    while c0 < K:
        c1 = int(np.searchsorted(starts, starts[c0] + rows, side="right")) - 1
        c1 = max(c1, c0 + 1)
        yield c0, min(c1, K)
        c0 = min(c1, K)


def _member_stats(x: np.ndarray, inv: np.ndarray, perm: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroids [K, d] (member means) and ||x - mu|| [n] at each position, exact in float32."""
    K = len(starts) - 1
    mu = np.empty((K, x.shape[1]), np.float32)
    a = np.empty(len(perm), np.float32)
    for c0, c1 in cluster_chunks(starts):
        s0, s1 = starts[c0], starts[c1]
        X = unit_rows(x, inv, perm[s0:s1])  # [b, d]
        local = starts[c0:c1] - s0
        sizes = np.diff(starts[c0:c1 + 1])
        mu[c0:c1] = np.add.reduceat(X, local, axis=0) / sizes[:, None].astype(np.float32)
        X -= np.repeat(mu[c0:c1], sizes, axis=0)
        a[s0:s1] = np.sqrt(np.einsum("ij,ij->i", X, X)) + np.float32(ROUND_UP)
    return mu, a
