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
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ._clusters import auto_size
from ._firstpass import Results, nearest_plain
from ._greedy import Dups, Trace, check_inputs, dist_to, first_pick, lazy_loop, plain_loop
from ._rows import blas_threads, row_inv_norms, torch_threads, unit_float32, unit_rows
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


def _start(x, inv, labeled, cfg_first, nearest, clusters=None):
    """First pass (unless given) -> (NearestResult, clusters, d0 [n] float32)."""
    if nearest is None:
        nearest, clusters = nearest_with(x, inv, labeled, None, cfg_first, clusters)
    elif len(nearest.dist) != len(x):
        raise ConfigError(f"nearest has {len(nearest.dist)} rows but the pool {len(x)}")
    elif nearest.clusters is not None and len(nearest.clusters.perm) == len(x):
        clusters = nearest.clusters  # built by the first pass over this pool: reuse
    return nearest, clusters, np.array(nearest.dist, dtype=np.float32)


def kcenter_greedy(pool: np.ndarray, labeled: np.ndarray, budget: int, weights: np.ndarray | None = None, *,
                   cfg: KCenterCfg = KCenterCfg(), nearest: NearestResult | None = None,
                   progress: Callable[[int], object] | None = None) -> KCenterResult:
    """k-center greedy from the labeled rows over the pool rows ([n, d] / [m, d], float16
    or float32; m may be 0). weights: None or [n] >= 0 (already u^beta). nearest: a
    precomputed first pass against `labeled`, reused as is. The pool is never modified
    and no float32 copy of it is made (peak memory: the pool + O(n) + O(m d); the plain
    fallback holds one only up to cfg.max_plain_bytes).

    Without labeled rows the first pick is the row maximising w_i * (cosine distance to
    the pool's mean direction), ties to the lower index; its priority and dist_at_pick
    are +inf (there is no center yet). budget >= n picks the whole pool. progress, when
    given, is called with 1 after each pick."""
    pool, labeled, budget, w = check_inputs(pool, labeled, budget, weights)
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
        return kcenter_torch(pool, labeled, budget, w, device="cuda", nearest=nearest, progress=progress)
    return _kcenter_cpu(pool, labeled, budget, w, cfg, nearest, progress)


def _kcenter_cpu(pool, labeled, budget, w, cfg: KCenterCfg, nearest, progress=None) -> KCenterResult:
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
    tr, stats = _loops(pool, inv, labeled, d, w, budget, cfg, method, clusters, progress)
    stats["first_pass_s"] = t1 - t0
    stats["loop_s"] = time.perf_counter() - t1
    log.info("k-center greedy (%s): %d picks from %d rows in %.2fs (first pass %.2fs)",
             method, budget, n, time.perf_counter() - t0, t1 - t0)
    return KCenterResult(tr.picks, tr.priority, tr.dist, radius_before, tr.radius, nearest, stats)


def _loops(pool, inv, labeled, d, w, budget, cfg, method, clusters, progress=None):
    from ._clusters import cluster_pool, ensure_stats
    from ._lazy import LazyGreedy

    n = len(pool)
    tr = Trace(budget, progress)
    t = 0
    centers = None
    dups = Dups(pool, w)
    if len(labeled) == 0:
        with torch_threads(1):
            i = first_pick(pool, inv, w)
            centers = unit_rows(pool, inv, np.array([i]))
            d = dist_to(pool, inv, centers[0])
        d[i] = 0.0
        d[dups.copies(i)] = 0.0  # exactly, as for every later pick
        tr.put(0, i, np.inf, np.inf, float(d.max()))
        t = 1
    stats = {"method": method}
    if method == "pruned" and t < budget:
        if clusters is None:
            clusters = cluster_pool(pool, inv, cfg.cluster_size, seed=cfg.seed)
        ensure_stats(clusters, pool, inv)
        lazy = LazyGreedy(pool, inv, clusters, d, w, budget, centers)
        if t:
            lazy.done(int(tr.picks[0]))
        with blas_threads(1), torch_threads(1):  # small products: one thread is faster
            give_up = cfg.give_up if cfg.method == "auto" else None
            t = lazy_loop(lazy, tr, t, budget, give_up, stats, centers is not None, dups)
            stats.update(work_share=lazy.work / max(1, n * t), refreshes_per_pick=lazy.refreshes / max(1, t))
            if t < budget:
                d = lazy.exact_d()
    if t < budget:
        with torch_threads(1):  # numpy's threads do the products; torch only casts
            plain_loop(pool, inv, d, w, tr, t, budget, cfg.max_plain_bytes)
    return tr, stats


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
    pool, labeled, budget, w = check_inputs(pool, labeled, budget, weights)
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
    tr = Trace(budget)
    t = 0
    if d is None:
        i = first_pick(pool, inv, w)
        d = dist_to(pool, inv, unit_rows(pool, inv, np.array([i]))[0])
        d[i] = 0.0
        d[Dups(pool, w).copies(i)] = 0.0
        tr.put(0, i, np.inf, np.inf, float(d.max()))
        t = 1
    radius_before = float(nearest.dist.max()) if len(labeled) else float("inf")
    plain_loop(pool, inv, d, w, tr, t, budget, max_bytes)
    stats = {"method": "plain", "first_pass_s": t1 - t0, "loop_s": time.perf_counter() - t1}
    return KCenterResult(tr.picks, tr.priority, tr.dist, radius_before, tr.radius, nearest, stats)


def kcenter_torch(pool: np.ndarray, labeled: np.ndarray, budget: int, weights: np.ndarray | None = None, *,
                  device: str = "cpu", nearest: NearestResult | None = None, block: int = 65536,
                  progress: Callable[[int], object] | None = None) -> KCenterResult:
    """The plain loop in torch on `device` (float16 storage, float32 arithmetic; TF32 off).
    Same definition, rows and first pick as kcenter_plain; testable on the CPU."""
    import torch

    t0 = time.perf_counter()
    pool, labeled, budget, w = check_inputs(pool, labeled, budget, weights)
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
        tr = Trace(budget, progress)
        picked = torch.zeros(n, dtype=torch.bool, device=dev)
        t = 0
        dups = Dups(pool, w)
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
                i = dups.resolve(i, lambda rows: picked[torch.from_numpy(rows).to(dev)].cpu().numpy(), float(prio[i]))
                prio_i = d_i if w is None else float(w[i] * np.float32(d_i))
            else:
                prio_i = d_i = float("inf")
            p = rows(i, i + 1)[0]
            for s in range(0, n, block):
                torch.minimum(d[s:s + block], torch.clamp(1.0 - rows(s, s + block) @ p, min=0.0), out=d[s:s + block])
            d[i] = 0.0
            d[torch.from_numpy(dups.copies(i)).to(dev)] = 0.0
            picked[i] = True
            tr.put(t, i, prio_i, d_i, float(d.max()))
            t += 1
    finally:
        torch.set_float32_matmul_precision(prec)
    radius_before = float(nearest.dist.max()) if len(labeled) else float("inf")
    stats = {"method": f"torch-{dev.type}", "first_pass_s": t1 - t0, "loop_s": time.perf_counter() - t1}
    return KCenterResult(tr.picks, tr.priority, tr.dist, radius_before, tr.radius, nearest, stats)
