"""Novelty scores against the labeled set: nearest labeled row, neighbours within a
radius, the default radius, and the covering radius.

Rows are renormalised to unit length in float32 first (_rows), and the distance is the
cosine distance 1 - x.y, clipped at 0. `nearest_labeled` is exact by default: a
triangle-inequality search over clusters of the pool for rows near the labeled set,
and a bfloat16 screen with a proven error window for the others (_firstpass). It
equals the brute-force search on the same float32 rows up to float32 rounding: a
different labeled index can come back only where two labeled rows are within ~1e-6
of each other. `NearestCfg(approximate=True)` uses a FAISS IVF index instead;
`nearest_recall` measures what that costs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ._clusters import PoolClusters, auto_size, cluster_pool
from ._firstpass import Results, Tick, nearest_plain, nearest_pruned
from ._rows import check_rows, row_inv_norms, torch_threads, unique_rows, unit_float32, unit_rows
from .errors import ConfigError

__all__ = ["NearestCfg", "NearestResult", "nearest_labeled", "nearest_recall", "default_radius",
           "covering_radius", "unit_float32"]

log = logging.getLogger(__name__)

METHODS = ("auto", "pruned", "plain")
PLAIN_BELOW = 50_000_000  # pool x labeled pairs under which the plain product is as fast


@dataclass(frozen=True)
class NearestCfg:
    approximate: bool = False  # FAISS IVF (nlist, nprobe) instead of the exact search
    nlist: int = 0  # IVF lists; 0: about 4 sqrt(m)
    nprobe: int = 16
    method: str = "auto"  # exact search: auto (pruned when it pays) | pruned | plain
    cluster_size: int = 0  # pool rows per cluster for the pruned search; 0: max(48, n / 4096)
    seed: int = 0


@dataclass
class NearestResult:
    dist: np.ndarray  # [n] float32 cosine distance to the nearest labeled row; +inf when there is none
    idx: np.ndarray  # [n] int64 index into labeled; ties -> lower index; -1 when there is none
    count: np.ndarray | None  # [n] int32 labeled rows within `radius` (inclusive); None without a radius
    radius: float | None = None
    approximate: bool = False
    # the pool clusters the exact search built, for kcenter_greedy to reuse (internal)
    clusters: PoolClusters | None = field(default=None, repr=False, compare=False)


def _check_cfg(cfg: NearestCfg) -> None:
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown nearest-labeled method {cfg.method!r}; choose one of: {', '.join(METHODS)}")
    if cfg.cluster_size < 0 or cfg.nprobe < 1 or cfg.nlist < 0:
        raise ConfigError(f"cluster_size and nlist must be >= 0 and nprobe >= 1, got {cfg}")


def nearest_labeled(pool: np.ndarray, labeled: np.ndarray, *, radius: float | None = None,
                    cfg: NearestCfg = NearestCfg(), progress: Tick = None) -> NearestResult:
    """For each pool row [n, d]: the nearest labeled row [m, d], its distance, and how many
    labeled rows lie within `radius` (cosine distance, inclusive). progress, when given,
    is told the number of pool rows settled as the search goes (n in all)."""
    pool, labeled = check_rows(pool, "pool"), check_rows(labeled, "labeled")
    res, _ = nearest_with(pool, row_inv_norms(pool), labeled, radius, cfg, progress=progress)
    return res


def nearest_with(x: np.ndarray, inv: np.ndarray, labeled: np.ndarray, radius: float | None, cfg: NearestCfg,
                 clusters: PoolClusters | None = None, progress: Tick = None) -> tuple[NearestResult, PoolClusters | None]:
    """nearest_labeled on rows with their inverse norms; reuses or returns the pool clusters."""
    _check_cfg(cfg)
    if radius is not None and not 0 <= radius <= 2:
        raise ConfigError(f"radius is a cosine distance in [0, 2], got {radius}")
    if len(labeled) and labeled.shape[1] != x.shape[1]:
        raise ConfigError(f"pool rows have {x.shape[1]} dims but labeled rows {labeled.shape[1]}")
    n, m = len(x), len(labeled)
    if m == 0 or n == 0:
        if progress is not None and n:
            progress(n)
        return NearestResult(np.full(n, np.inf, np.float32), np.full(n, -1, np.int64),
                             np.zeros(n, np.int32) if radius is not None else None, radius, False), clusters
    t0 = time.perf_counter()
    first, _, copies = unique_rows(labeled)  # identical labeled rows: one row, the lower index
    dedup = len(first) < m
    Y = unit_float32(labeled[first] if dedup else labeled)  # [u, d]
    res = Results(n, radius is not None, copies.astype(np.int32) if dedup else None)
    if cfg.approximate:
        _nearest_ivf(x, inv, Y, radius, cfg, res, progress=progress)
        how = "IVF"
    elif cfg.method == "plain" or (cfg.method == "auto" and (n * len(Y) < PLAIN_BELOW
                                                             or n < 8 * auto_size(n, cfg.cluster_size))):
        with torch_threads(1):
            nearest_plain(x, inv, Y, radius, res, progress=progress)
        how = "plain"
    else:
        if clusters is None:
            clusters = cluster_pool(x, inv, cfg.cluster_size, seed=cfg.seed)
        nearest_pruned(x, inv, Y, clusters, radius, res, progress=progress)
        how = "pruned"
    dist = np.maximum(np.float32(1.0) - res.sim, np.float32(0.0))
    idx = first[res.idx] if dedup else res.idx
    log.info("nearest labeled (%s): %d x %d in %.2fs", how, n, m, time.perf_counter() - t0)
    return NearestResult(dist, idx, res.count, radius, cfg.approximate, clusters), clusters


def _nearest_ivf(x: np.ndarray, inv: np.ndarray, Y: np.ndarray, radius: float | None, cfg: NearestCfg,
                 res: Results, block: int = 16384, progress: Tick = None) -> None:
    """Approximate: FAISS IVF-Flat (inner product) over the labeled rows."""
    import faiss

    m, d = Y.shape
    nlist = cfg.nlist or int(np.clip(4 * np.sqrt(m), 1, max(1, m // 39)))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = cfg.seed
    index.cp.min_points_per_centroid = 1  # nlist is ours to choose; no warning on stderr
    index.train(Y)
    index.add(Y)
    index.nprobe = min(cfg.nprobe, nlist)
    for s in range(0, len(x), block):
        X = unit_rows(x, inv, slice(s, s + block))
        D, I = index.search(X, 1)
        res.sim[s:s + len(X)], res.idx[s:s + len(X)] = D[:, 0], I[:, 0]
        miss = np.flatnonzero(I[:, 0] < 0)  # probed lists were empty: search those exactly
        if len(miss):
            S = X[miss] @ Y.T
            res.sim[s + miss], res.idx[s + miss] = S.max(axis=1), S.argmax(axis=1)
        if radius is not None:
            lims, _, I = index.range_search(X, float(1.0 - radius) - 1e-7)
            lims = lims.astype(np.int64)
            w = np.ones(len(I), np.int64) if res.mult is None else res.mult[I]
            res.count[s:s + len(X)] = np.add.reduceat(np.r_[w, 0], lims[:-1]) * (np.diff(lims) > 0)
        if progress is not None:
            progress(len(X))


def nearest_recall(pool: np.ndarray, labeled: np.ndarray, cfg: NearestCfg = NearestCfg(approximate=True),
                   sample: int = 10000, seed: int = 0) -> dict:
    """Recall@1 of the approximate search against the exact one on a seeded sample of the
    pool. A row counts as found when the approximate distance equals the exact one
    (within 1e-6: ties are not misses). -> {recall, sample, max_dist_error}."""
    pool, labeled = check_rows(pool, "pool"), check_rows(labeled, "labeled")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(pool), min(sample, len(pool)), replace=False))
    sub = pool[rows]
    approx = nearest_labeled(sub, labeled, cfg=NearestCfg(**{**cfg.__dict__, "approximate": True}))
    exact = nearest_labeled(sub, labeled, cfg=NearestCfg(method="plain"))
    err = approx.dist - exact.dist
    return {"recall": float(np.mean(err <= 1e-6)) if len(rows) else 1.0, "sample": len(rows),
            "max_dist_error": float(err.max()) if len(rows) else 0.0}


def default_radius(labeled: np.ndarray, quantile: float = 0.05, max_sample: int = 5000, seed: int = 0) -> float:
    """The `quantile` of leave-one-out nearest-neighbour cosine distances inside the
    labeled set: up to `max_sample` labeled rows (seeded sample) are queried against all
    labeled rows but themselves (an exact duplicate elsewhere counts, at distance 0).
    With fewer than 2 labeled rows there is no neighbour to measure and the radius is 0.0."""
    labeled = check_rows(labeled, "labeled")
    if not 0 <= quantile <= 1:
        raise ConfigError(f"quantile must be in [0, 1], got {quantile}")
    m = len(labeled)
    if m < 2:
        log.info("default radius: %d labeled row(s), radius 0.0", m)
        return 0.0
    Y = unit_float32(labeled)
    rng = np.random.default_rng(seed)
    q = np.arange(m) if m <= max_sample else np.sort(rng.choice(m, max_sample, replace=False))
    best = np.empty(len(q), np.float32)
    step = max(64, (1 << 22) // m)
    for s in range(0, len(q), step):
        qi = q[s:s + step]
        S = Y[qi] @ Y.T  # [b, m]
        S[np.arange(len(qi)), qi] = -np.inf  # leave the query itself out
        best[s:s + step] = S.max(axis=1)
    return float(np.quantile(np.maximum(np.float32(1.0) - best, 0.0), quantile))


def covering_radius(pool: np.ndarray, labeled: np.ndarray, picks: np.ndarray | None = None,
                    nearest_dist: np.ndarray | None = None) -> float:
    """max over the pool of the distance to the nearest center, the centers being the
    labeled rows and the picked pool rows. +inf without any center, 0.0 for an empty pool.
    nearest_dist [n]: the pool's distances to the labeled rows when already known (a
    NearestResult.dist); then only the picks are searched."""
    pool, labeled = check_rows(pool, "pool"), check_rows(labeled, "labeled")
    if len(pool) == 0:
        return 0.0
    has_picks = picks is not None and len(picks) > 0
    if nearest_dist is not None:
        d = np.asarray(nearest_dist, dtype=np.float32)
        if has_picks:
            d = np.minimum(d, nearest_labeled(pool, pool[np.asarray(picks)]).dist)
        return float(d.max())
    centers = np.concatenate([labeled, pool[np.asarray(picks)]]) if has_picks else labeled
    return float(nearest_labeled(pool, centers).dist.max())
