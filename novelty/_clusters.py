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

from ._rows import BLOCK, bf16_bits, bf16_mm, blas_threads, torch_threads, unit_rows

log = logging.getLogger(__name__)

ROUND_UP = 1e-5  # added to every radius: covers float32 error in ||x - mu||
SAMPLE = 8  # training rows per cluster
ITERS = (4, 2)  # Lloyd iterations: coarse cells, clusters inside a cell


@dataclass
class PoolClusters:
    perm: np.ndarray  # [n] int64: the pool row at each position; a cluster's members are contiguous, ascending
    starts: np.ndarray  # [K + 1] int64: cluster c holds positions starts[c]:starts[c + 1]
    # filled by chunk_stats (in the first pass, which reads the rows anyway) or ensure_stats
    mu: np.ndarray | None = None  # [K, d] float32: mean of the members' unit rows
    mu2: np.ndarray | None = None  # [K] float32: ||mu||^2
    a: np.ndarray | None = None  # [n] float32: ||x - mu|| of the row at each position, rounded up
    r: np.ndarray | None = None  # [K] float32: max of a over the members

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


def _assign_bf16(Xb: np.ndarray, C: np.ndarray) -> np.ndarray:
    """_assign through one bfloat16 product (torch) on Xb, bfloat16 bits of the rows:
    about the nearest centroid, which is all an assignment needs (the bounds are computed
    afterwards, exactly, from the members)."""
    import torch

    S = bf16_mm(Xb, bf16_bits(C), pad_b=True).float()
    S -= torch.from_numpy(0.5 * np.einsum("ij,ij->i", C, C))
    return S.argmax(dim=1).numpy().astype(np.int64)


def _rows_bf16(x: np.ndarray, s: int, e: int) -> np.ndarray:
    """bfloat16 bits of rows s:e as stored (about unit length: good enough to assign)."""
    import torch

    out = np.empty((e - s, x.shape[1]), np.uint16)
    torch.from_numpy(out).view(torch.bfloat16).copy_(torch.from_numpy(np.ascontiguousarray(x[s:e])))
    return out


def _sample(rng: np.random.Generator, idx: np.ndarray, cap: int) -> np.ndarray:
    return idx if len(idx) <= cap else np.sort(rng.choice(idx, cap, replace=False))


MAX_CLUSTERS = 4096


def auto_size(n: int, size: int = 0) -> int:
    """Rows per cluster: `size` when > 0, else max(48, n / 4096): bounds need clusters about
    as fine as the data's own structure, whose scale does not grow with n, while the
    per-cluster bookkeeping grows with their number."""
    return size if size > 0 else max(48, -(-n // MAX_CLUSTERS))


def cluster_pool(x: np.ndarray, inv: np.ndarray, size: int = 0, seed: int = 0) -> PoolClusters:
    """Cluster the rows of x ([n, d], inv from row_inv_norms) into about n / size clusters
    (size 0: auto_size). Centroids and radii are left to chunk_stats / ensure_stats."""
    with blas_threads(1), torch_threads(1):  # one thread but for the large products (bf16_mm)
        return _cluster_pool(x, inv, auto_size(len(x), size), seed)


def _cluster_pool(x: np.ndarray, inv: np.ndarray, size: int, seed: int) -> PoolClusters:
    n, d = x.shape
    rng = np.random.default_rng(seed)
    k = max(1, round(n / size))
    k1 = max(1, min(k, math.ceil(math.sqrt(k))))
    # train on one sample: coarse cells, then clusters inside each cell
    S = unit_rows(x, inv, _sample(rng, np.arange(n), max(64 * k1, SAMPLE * k)))  # [s, d]
    C1 = _lloyd(S, k1, ITERS[0], rng)
    s_cell = _assign(S, C1)
    fine, offset = [], [0]
    for j in range(len(C1)):
        Sj = S[s_cell == j]
        kj = max(1, min(len(Sj), round(k * len(Sj) / len(S))))
        fine.append(_lloyd(Sj, kj, ITERS[1], rng) if len(Sj) else C1[j:j + 1])
        offset.append(offset[-1] + len(fine[-1]))
    # assign every row in one pass
    label = np.empty(n, np.int64)
    for s in range(0, n, 2 * BLOCK):
        Xb = _rows_bf16(x, s, min(n, s + 2 * BLOCK))
        cell = _assign_bf16(Xb, C1)
        o = np.argsort(cell, kind="stable")
        Xb, heads = Xb[o], np.searchsorted(cell[o], np.arange(len(C1) + 1))
        for j in np.flatnonzero(np.diff(heads)):
            a, b = heads[j], heads[j + 1]
            label[s + o[a:b]] = offset[j] + (_assign_bf16(Xb[a:b], fine[j]) if len(fine[j]) > 1 else 0)
    # compact labels, order positions by (cluster, pool row)
    used, label = np.unique(label, return_inverse=True)
    perm = np.argsort(label, kind="stable")
    sizes = np.bincount(label, minlength=len(used))
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    log.debug("pool clusters: %d (sizes %d..%d)", len(sizes), sizes.min(), sizes.max())
    return PoolClusters(perm, starts)


def cluster_chunks(starts: np.ndarray, rows: int = BLOCK):
    """(c0, c1): runs of whole clusters holding about `rows` positions each."""
    K = len(starts) - 1
    c0 = 0
    while c0 < K:
        c1 = int(np.searchsorted(starts, starts[c0] + rows, side="right")) - 1
        c1 = max(c1, c0 + 1)
        yield c0, min(c1, K)
        c0 = min(c1, K)


def chunk_stats(cl: PoolClusters, c0: int, c1: int, X: np.ndarray) -> None:
    """Centroid, member distances and radius of clusters c0..c1-1 from their unit rows
    X [b, d] (positions starts[c0]:starts[c1]), exact in float32."""
    if cl.mu is None:
        K, n = cl.k, len(cl.perm)
        cl.mu, cl.mu2 = np.empty((K, X.shape[1]), np.float32), np.empty(K, np.float32)
        cl.a, cl.r = np.empty(n, np.float32), np.empty(K, np.float32)
    import torch

    s0, s1 = cl.starts[c0], cl.starts[c1]
    sizes = np.diff(cl.starts[c0:c1 + 1])
    heads = cl.starts[c0:c1] - s0
    slot = torch.from_numpy(np.repeat(np.arange(c1 - c0), sizes))
    Xt = torch.from_numpy(X)
    mu = torch.zeros(c1 - c0, X.shape[1]).index_add_(0, slot, Xt) / torch.from_numpy(sizes.astype(np.float32))[:, None]
    a = (Xt - mu[slot]).norm(dim=1).numpy() + np.float32(ROUND_UP)
    mu = mu.numpy()
    cl.mu[c0:c1], cl.mu2[c0:c1] = mu, np.einsum("ij,ij->i", mu, mu)
    cl.a[s0:s1], cl.r[c0:c1] = a, np.maximum.reduceat(a, heads)


def ensure_stats(cl: PoolClusters, x: np.ndarray, inv: np.ndarray) -> PoolClusters:
    """Fill the centroids and radii if the first pass did not."""
    if cl.mu is not None:
        return cl
    with torch_threads(1):
        for c0, c1 in cluster_chunks(cl.starts):
            chunk_stats(cl, c0, c1, unit_rows(x, inv, cl.perm[cl.starts[c0]:cl.starts[c1]]))
    return cl
