"""`novelty select`: load the vectors, score the pool against the labeled set, run a
strategy, record the run and its picks in the catalog, and return rows to write."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import records, scores, strategies
from .errors import ConfigError
from .store import open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectCfg:
    budget: int
    strategy: str | None = None  # None: hybrid when uncertainty scores exist, else kcenter
    beta: float = 1.0  # --uncertainty-weight: w = u^beta
    seed: int = 0
    radius: float | None = None  # labeled_neighbors radius; None: scores.default_radius
    approximate: bool = False  # IVF first pass instead of the exact one
    device: str = "auto"


@dataclass
class SelectResult:
    rows: list[dict]
    summary: dict
    run: int
    warnings: list[str] = field(default_factory=list)


def pool_uncertainty(store, pool_ids: np.ndarray, warnings: list[str]) -> tuple[np.ndarray | None, dict | None]:
    """The latest scores in pool order; images without one get the pool's mean (warned)."""
    latest = records.latest_uncertainty(store)
    if latest is None:
        return None, None
    u = np.full(len(pool_ids), np.nan)
    pos = np.searchsorted(latest.ids, pool_ids)
    hit = (pos < len(latest.ids)) & (latest.ids[np.minimum(pos, len(latest.ids) - 1)] == pool_ids)
    u[hit] = latest.values[pos[hit]]
    if not hit.any():
        warnings.append(f"uncertainty run #{latest.run} scores no unlabeled image; ignoring it")
        return None, None
    if not hit.all():
        warnings.append(f"{int((~hit).sum())} unlabeled image(s) have no uncertainty score; they get the mean score")
        u[~hit] = u[hit].mean()
    return u, {"run": latest.run, **latest.params}


def select(root: Path, cfg: SelectCfg) -> SelectResult:
    if cfg.budget <= 0:
        raise ConfigError(f"--budget must be > 0, got {cfg.budget}")
    if not (math.isfinite(cfg.beta) and cfg.beta >= 0):
        raise ConfigError(f"--uncertainty-weight must be a finite number >= 0, got {cfg.beta}")
    if cfg.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {cfg.seed}")
    if cfg.radius is not None and not 0 <= cfg.radius <= 2:
        raise ConfigError(f"--radius is a cosine distance in [0, 2], got {cfg.radius}")
    if cfg.strategy is not None:
        strategies.get_strategy(cfg.strategy)  # unknown names fail before any work
    t0 = time.monotonic()
    warnings: list[str] = []
    with open_store(root, writable=True) as store:
        pool_ids, pool = store.vectors("unlabeled")  # [n] int64, [n, d] float16
        if len(pool_ids) == 0:
            raise ConfigError(f"index {root} has no embedded unlabeled images to select from")
        lab_ids, labeled = store.vectors("labeled")  # [m], [m, d]
        budget = cfg.budget
        if budget > len(pool_ids):
            warnings.append(f"budget {budget} exceeds the {len(pool_ids)} unlabeled images; selecting them all")
            budget = len(pool_ids)
        u, u_info = pool_uncertainty(store, pool_ids, warnings)
        name = cfg.strategy or strategies.default_strategy(u is not None)
        radius = cfg.radius if cfg.radius is not None else scores.default_radius(labeled)
        t1 = time.monotonic()
        nearest = scores.nearest_labeled(pool, labeled, radius=radius, cfg=scores.NearestCfg(approximate=cfg.approximate))
        t2 = time.monotonic()
        from .kcenter import KCenterCfg

        x = strategies.SelectionInput(pool, labeled, budget, nearest, u, cfg.beta, cfg.seed, KCenterCfg(device=cfg.device))
        sel = strategies.get_strategy(name)(x)
        t3 = time.monotonic()
        radius_before = float(nearest.dist.max()) if len(lab_ids) else float("inf")
        if sel.radius_trace is not None and len(sel.radius_trace):
            radius_after = float(sel.radius_trace[-1])
        else:
            radius_after = scores.covering_radius(pool, labeled, sel.picks, nearest_dist=nearest.dist)
        picks = sel.picks
        meta = store.describe(np.concatenate([pool_ids[picks], lab_ids[np.unique(nearest.idx[picks][nearest.idx[picks] >= 0])]]))
        rows = []
        for rank, p in enumerate(picks.tolist(), start=1):
            shown, path, _ = meta[int(pool_ids[p])]
            li = int(nearest.idx[p])
            rows.append({
                "rank": rank,
                "id": shown,
                "path": path,
                "priority": float(sel.priority[rank - 1]),
                "novelty": float(nearest.dist[p]) if li >= 0 else None,
                "uncertainty": float(u[p]) if u is not None else None,
                "nearest_labeled_id": meta[int(lab_ids[li])][0] if li >= 0 else None,
                "nearest_labeled_distance": float(nearest.dist[p]) if li >= 0 else None,
                "labeled_neighbors": int(nearest.count[p]) if nearest.count is not None else None,
                "distance_at_pick": float(sel.dist_at_pick[rank - 1]) if sel.dist_at_pick is not None else None,
            })
        redundant = float(np.mean(nearest.count > 0)) if nearest.count is not None else 0.0
        summary = {
            "strategy": name,
            "picks": len(picks),
            "pool": len(pool_ids),
            "labeled": len(lab_ids),
            "radius": radius,
            "covering_radius_before": radius_before,
            "covering_radius_after": radius_after,
            "redundant_share": redundant,
            "uncertainty": u_info,
            "seconds": {"load": t1 - t0, "first_pass": t2 - t1, "select": t3 - t2, "total": time.monotonic() - t0},
        }
        params = {**asdict(cfg), "strategy": name, "budget": budget}
        run = records.save_selection(store, params, summary, pool_ids[picks], sel.priority, sel.radius_trace)
        for w in warnings:
            log.warning("warning: %s", w)  # the CLI's stderr line too
        return SelectResult(rows, summary, run, warnings)
