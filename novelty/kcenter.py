"""k-center greedy (Sener & Savarese 2018): exact, weighted, and fast on a CPU.

The labeled rows are the initial centers; d_i is the cosine distance from pool row i
to its nearest center. Each step picks the not-yet-picked row with the largest w_i d_i
(w = 1 without weights), ties toward the lower pool index, and makes it a center.

Three implementations of the same definition, on the same unit float32 rows (_rows):
  kcenter_plain   the reference: a chunked float32 GEMM first pass, then one
                  matrix-vector product over the whole pool per pick.
  pruned (CPU)    the default: the exact pruned first pass (scores) and a lazy loop over
                  pool clusters that skips rows whose distance provably cannot change or
                  cannot matter yet (_lazy). It falls back to the plain loop by itself
                  when the data has no structure to exploit.
  kcenter_torch   the plain loop in torch on any device; used on CUDA.
They agree up to float32 rounding: picks may differ only after a near-tie (two
candidates within ~1e-6), and the covering radius then still agrees to ~1e-6.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ._clusters import auto_size
from ._firstpass import Results, nearest_plain
from ._rows import blas_threads, check_rows, duplicate_groups, row_inv_norms, torch_threads, unit_float32, unit_rows
from .errors import ConfigError
from .scores import NearestCfg, NearestResult, nearest_with

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
METHODS = ("auto", "pruned", "plain")


@dataclass(frozen=True)
class KCenterCfg:
    device: str = "auto"  # auto: the torch loop on CUDA when present, else the CPU path | cpu | cuda
    method: str = "auto"  # CPU path: auto (pruned, plain when pruning does not pay) | pruned | plain
    cluster_size: int = 0  # pool rows per cluster for the bounds; 0: max(48, n / 4096)
    give_up: float = 0.5  # auto: switch to the plain loop past this share of its work
    max_plain_bytes: int = 1 << 30  # float32 copy of the pool the plain loop may hold; else block-wise
    first_pass: NearestCfg = NearestCfg()  # when no `nearest` is passed
    seed: int = 0


@dataclass
class KCenterResult:
    picks: np.ndarray  # [B] int64 pool indices in pick order
    priority: np.ndarray  # [B] float32 w * d at pick time
    dist_at_pick: np.ndarray  # [B] float32 d at pick time
    radius_before: float  # max_i d_i before any pick; inf without labeled rows
    radius_trace: np.ndarray  # [B] float32 covering radius (max_i d_i) after each pick
    nearest: NearestResult  # the first pass used
    stats: dict = field(default_factory=dict)  # method, seconds, work share


class _Dups:
    """Bitwise-identical pool rows have equal d in exact arithmetic, but float32 products
    at different positions of a GEMM can round them apart. When the argmax lands in such
    a group, the pick goes to the group's unpicked row of largest weight, ties to the
    lower index: the exact-arithmetic answer."""

    def __init__(self, x: np.ndarray, w: np.ndarray | None):
        self.groups = duplicate_groups(x)
        self.of = {int(j): rep for rep, mem in self.groups.items() for j in mem}
        self.w = w

    def resolve(self, i: int, picked) -> int:
        """picked(rows) -> bool mask."""
        rep = self.of.get(i)
        if rep is None:
            return i
        free = self.groups[rep][~picked(self.groups[rep])]
        return int(free[0] if self.w is None else free[np.argmax(self.w[free])])


class _Trace:
    def __init__(self, budget: int):
        self.picks = np.empty(budget, np.int64)
        self.priority = np.empty(budget, np.float32)
        self.dist = np.empty(budget, np.float32)
        self.radius = np.empty(budget, np.float32)

    def put(self, t: int, row: int, prio: float, d: float, radius: float) -> None:
        self.picks[t], self.priority[t], self.dist[t], self.radius[t] = row, prio, d, radius


def _check(pool, labeled, budget, weights):
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


def _start(x, inv, labeled, cfg_first, nearest, clusters=None):
    """First pass (unless given) -> (NearestResult, clusters, d0 [n] float32)."""
    if nearest is None:
        nearest, clusters = nearest_with(x, inv, labeled, None, cfg_first, clusters)
    elif len(nearest.dist) != len(x):
        raise ConfigError(f"nearest has {len(nearest.dist)} rows but the pool {len(x)}")
    return nearest, clusters, np.array(nearest.dist, dtype=np.float32)


def kcenter_greedy(pool: np.ndarray, labeled: np.ndarray, budget: int, weights: np.ndarray | None = None, *,
                   cfg: KCenterCfg = KCenterCfg(), nearest: NearestResult | None = None) -> KCenterResult:
    """k-center greedy from the labeled rows over the pool rows ([n, d] / [m, d], float16
    or float32; m may be 0). weights: None or [n] >= 0 (already u^beta). nearest: a
    precomputed first pass against `labeled`, reused as is. The pool is never modified
    and no float32 copy of it is made (peak memory: the pool + O(n) + O(m d)).

    Without labeled rows the first pick is the row maximising w_i * (cosine distance to
    the pool's mean direction), ties to the lower index; its priority and dist_at_pick
    are +inf (there is no center yet). budget >= n picks the whole pool."""
    pool, labeled, budget, w = _check(pool, labeled, budget, weights)
    if cfg.device not in DEVICES:
        raise ConfigError(f"unknown device {cfg.device!r}; choose one of: {', '.join(DEVICES)}")
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown k-center method {cfg.method!r}; choose one of: {', '.join(METHODS)}")
    device = cfg.device
    if device != "cpu":
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' asked for but torch sees no CUDA device")
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return kcenter_torch(pool, labeled, budget, w, device="cuda", nearest=nearest)
    return _kcenter_cpu(pool, labeled, budget, w, cfg, nearest)


def _kcenter_cpu(pool, labeled, budget, w, cfg: KCenterCfg, nearest) -> KCenterResult:
    t0 = time.perf_counter()
    n = len(pool)
    inv = row_inv_norms(pool)
    small = n < 8 * auto_size(n, cfg.cluster_size)
    method = "plain" if cfg.method == "plain" or (cfg.method == "auto" and small) else "pruned"
    first = NearestCfg(**{**cfg.first_pass.__dict__, "cluster_size": cfg.cluster_size, "seed": cfg.seed,
                          **({} if method == "pruned" else {"method": "plain"})})
    nearest, clusters, d = _start(pool, inv, labeled, first, nearest)
    t1 = time.perf_counter()
    radius_before = float(d.max()) if len(labeled) else float("inf")
    tr, stats = _loops(pool, inv, labeled, d, w, budget, cfg, method, clusters)
    stats["first_pass_s"] = t1 - t0
    stats["loop_s"] = time.perf_counter() - t1
    log.info("k-center greedy (%s): %d picks from %d rows in %.2fs (first pass %.2fs)",
             method, budget, n, time.perf_counter() - t0, t1 - t0)
    return KCenterResult(tr.picks, tr.priority, tr.dist, radius_before, tr.radius, nearest, stats)


def _loops(pool, inv, labeled, d, w, budget, cfg, method, clusters):
    from ._clusters import cluster_pool, ensure_stats
    from ._lazy import LazyGreedy

    n = len(pool)
    tr = _Trace(budget)
    t = 0
    centers = None
    if len(labeled) == 0:
        with torch_threads(1):
            i = first_pick(pool, inv, w)
            centers = unit_rows(pool, inv, np.array([i]))
            d = _dist_to(pool, inv, centers[0])
        d[i] = 0.0
        tr.put(0, i, np.inf, np.inf, float(d.max()))
        t = 1
    stats = {"method": method}
    if method == "pruned" and t < budget:
        if clusters is None:
            clusters = cluster_pool(pool, inv, cfg.cluster_size, seed=cfg.seed)
        ensure_stats(clusters, pool, inv)
        lazy = LazyGreedy(pool, inv, clusters, d, w, budget, centers)
        with blas_threads(1):  # small products: one thread is faster (torch keeps its own)
            t = _lazy_loop(lazy, tr, t, budget, cfg, stats, centers is not None, _Dups(pool, w))
            stats.update(work_share=lazy.work / max(1, n * t), refreshes_per_pick=lazy.refreshes / max(1, t))
            if t < budget:
                d = lazy.exact_d()
    if t < budget:
        with torch_threads(1):  # numpy's threads do the products; torch only casts
            _plain_loop(pool, inv, d, w, tr, t, budget, cfg.max_plain_bytes)
    return tr, stats


def _lazy_loop(lazy, tr: _Trace, t: int, budget: int, cfg: KCenterCfg, stats: dict, first: bool, dups: _Dups) -> int:
    """Picks t..budget-1 with the pruned loop; stops early (returns t) past cfg.give_up."""
    from ._lazy import DONE

    n = len(lazy.perm)
    if dups.groups:
        pos = np.empty(n, np.int64)
        pos[lazy.perm] = np.arange(n)
    while t < budget:
        i = lazy.top(True)
        if dups.groups:
            row = dups.resolve(int(lazy.perm[i]), lambda rows: lazy.applied[pos[rows]] == DONE)
            row, prio, dist = lazy.pick(int(pos[row]), d_at=float(lazy.dp[i]))
        else:
            row, prio, dist = lazy.pick(i)
        tr.put(t, row, prio, dist, float(lazy.dp[lazy.top(False)]))
        t += 1
        if cfg.method == "auto" and t >= 64 and lazy.work > cfg.give_up * n * (t - first):
            log.info("k-center: pruning does not pay here (%.0f%% of the plain work); plain loop from pick %d",
                     100 * lazy.work / (n * t), t)
            stats["fell_back_at"] = t
            break
    return t


def _dist_to(x, inv, p, block: int = 16384) -> np.ndarray:
    """[n] float32 cosine distance from every row to the unit row p, clipped at 0."""
    d = np.empty(len(x), np.float32)
    for s in range(0, len(x), block):
        d[s:s + block] = np.maximum(np.float32(1.0) - unit_rows(x, inv, slice(s, s + block)) @ p, 0)
    return d


def _plain_loop(x, inv, d, w, tr: _Trace, t: int, budget: int, max_bytes: int, block: int = 65536) -> None:
    """Picks t..budget-1 with one matrix-vector product over the pool per pick; d [n] is
    updated in place. Holds the pool's unit float32 rows when they fit in max_bytes."""
    n, dim = x.shape
    X = unit_rows(x, inv) if n * dim * 4 <= max_bytes else None  # [n, d] or block-wise
    prio = np.empty(n, np.float32)
    nd = np.empty(n, np.float32)
    dups = _Dups(x, w)
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
        i = dups.resolve(i, picked.__getitem__)
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
        tr.put(t, i, prio_i, d_i, float(d.max()))
        t += 1


def kcenter_plain(pool: np.ndarray, labeled: np.ndarray, budget: int, weights: np.ndarray | None = None,
                  max_elems: int = 1 << 24, max_bytes: int = 4 << 30) -> KCenterResult:
    """The plain reference: a chunked float32 GEMM first pass (max_elems distances at a time), then
    one float32 matrix-vector product over the pool per pick (on a float32 copy of the
    pool when it fits in max_bytes, else re-reading it block-wise). Same definition and
    first pick as kcenter_greedy."""
    with torch_threads(1):  # numpy's threads do the products; torch only casts
        return _kcenter_plain(pool, labeled, budget, weights, max_elems, max_bytes)


def _kcenter_plain(pool, labeled, budget, weights, max_elems, max_bytes) -> KCenterResult:
    t0 = time.perf_counter()
    pool, labeled, budget, w = _check(pool, labeled, budget, weights)
    n = len(pool)
    inv = row_inv_norms(pool)
    if len(labeled):
        res = Results(n, False)
        nearest_plain(pool, inv, unit_float32(labeled), None, res, max_elems=max_elems)
        d = np.maximum(np.float32(1.0) - res.sim, np.float32(0.0))
        nearest = NearestResult(d.copy(), res.idx, None)
    else:
        d = None
        nearest = NearestResult(np.full(n, np.inf, np.float32), np.full(n, -1, np.int64), None)
    t1 = time.perf_counter()
    tr = _Trace(budget)
    t = 0
    if d is None:
        i = first_pick(pool, inv, w)
        d = _dist_to(pool, inv, unit_rows(pool, inv, np.array([i]))[0])
        d[i] = 0.0
        tr.put(0, i, np.inf, np.inf, float(d.max()))
        t = 1
    radius_before = float(nearest.dist.max()) if len(labeled) else float("inf")
    _plain_loop(pool, inv, d, w, tr, t, budget, max_bytes)
    stats = {"method": "plain", "first_pass_s": t1 - t0, "loop_s": time.perf_counter() - t1}
    return KCenterResult(tr.picks, tr.priority, tr.dist, radius_before, tr.radius, nearest, stats)


def kcenter_torch(pool: np.ndarray, labeled: np.ndarray, budget: int, weights: np.ndarray | None = None, *,
                  device: str = "cpu", nearest: NearestResult | None = None, block: int = 65536) -> KCenterResult:
    """The plain loop in torch on `device` (float16 storage, float32 arithmetic; TF32 off).
    Same definition, rows and first pick as kcenter_plain; testable on the CPU."""
    import torch

    t0 = time.perf_counter()
    pool, labeled, budget, w = _check(pool, labeled, budget, weights)
    n = len(pool)
    inv_np = row_inv_norms(pool)
    dev = torch.device(device)
    X = torch.from_numpy(pool).to(dev)  # [n, d] stored dtype
    inv = torch.from_numpy(inv_np).to(dev)

    def rows(s, e):
        return X[s:e].float() * inv[s:e, None]

    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        if nearest is None and len(labeled):
            Y = torch.from_numpy(unit_float32(labeled)).to(dev)
            sim = torch.empty(n, device=dev)
            idx = torch.empty(n, dtype=torch.int64, device=dev)
            step = max(64, min(block, (1 << 25) // len(labeled)))
            for s in range(0, n, step):
                sim[s:s + step], idx[s:s + step] = (rows(s, s + step) @ Y.T).max(dim=1)
            dist = torch.clamp(1.0 - sim, min=0.0)
            nearest = NearestResult(dist.cpu().numpy(), idx.cpu().numpy(), None)
        elif nearest is None:
            nearest = NearestResult(np.full(n, np.inf, np.float32), np.full(n, -1, np.int64), None)
        t1 = time.perf_counter()
        wt = None if w is None else torch.from_numpy(w).to(dev)
        tr = _Trace(budget)
        picked = torch.zeros(n, dtype=torch.bool, device=dev)
        t = 0
        dups = _Dups(pool, w)
        if len(labeled):
            d = torch.from_numpy(np.array(nearest.dist, dtype=np.float32)).to(dev)
        else:
            i = first_pick(pool, inv_np, w)
            d = torch.full((n,), float("inf"), device=dev)
        while t < budget:
            if t > 0 or len(labeled):
                prio = d.clone() if wt is None else wt * d
                prio[picked] = -float("inf")
                i = int(torch.argmax(prio))  # first max: the lower index
                d_i = float(d[i])
                i = dups.resolve(i, lambda rows: picked[torch.from_numpy(rows).to(dev)].cpu().numpy())
                prio_i = d_i if w is None else float(w[i] * np.float32(d_i))
            else:
                prio_i = d_i = float("inf")
            p = rows(i, i + 1)[0]
            for s in range(0, n, block):
                torch.minimum(d[s:s + block], torch.clamp(1.0 - rows(s, s + block) @ p, min=0.0), out=d[s:s + block])
            d[i] = 0.0
            picked[i] = True
            tr.put(t, i, prio_i, d_i, float(d.max()))
            t += 1
    finally:
        torch.set_float32_matmul_precision(prec)
    radius_before = float(nearest.dist.max()) if len(labeled) else float("inf")
    stats = {"method": f"torch-{dev.type}", "first_pass_s": t1 - t0, "loop_s": time.perf_counter() - t1}
    return KCenterResult(tr.picks, tr.priority, tr.dist, radius_before, tr.radius, nearest, stats)
