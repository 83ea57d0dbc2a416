"""`novelty select`: load the vectors, score the pool against the labeled set, run a
strategy, record the run and its picks in the catalog, and return rows to write."""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
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
    """The latest scores in pool order, NaN for images without one; None when the run
    scores no image of the pool (warned)."""
    latest = records.latest_uncertainty(store)
    if latest is None:
        return None, None
    u = np.full(len(pool_ids), np.nan)
    pos = np.searchsorted(latest.ids, pool_ids)
    hit = (pos < len(latest.ids)) & (latest.ids[np.minimum(pos, len(latest.ids) - 1)] == pool_ids)
    u[hit] = latest.values[pos[hit]]
    if not hit.any():
        warnings.append(f"uncertainty run #{latest.run} scores no image of the pool (unlabeled, embedded, not excluded); "
                        f"ignoring it")
        return None, None
    return u, {"run": latest.run, **latest.params}


def filled_uncertainty(u: np.ndarray, name: str, warnings: list[str]) -> np.ndarray:
    """u with the pool's mean score for images without one (warned when `name` ranks by it)."""
    missing = np.isnan(u)
    if not missing.any():
        return u
    if name in strategies.USES_UNCERTAINTY:
        warnings.append(f"{int(missing.sum())} unlabeled image(s) have no uncertainty score; "
                        f"{name} gives them the mean score (their uncertainty column is left empty)")
    return np.where(missing, u[~missing].mean(), u)


def not_embedded(store, warnings: list[str]) -> None:
    """Warn about images a killed or unfinished build-index left pending: they have no
    vector, so they are neither in the pool nor centers."""
    pending = dict(store.db.execute("SELECT split, COUNT(*) FROM images WHERE status='pending' GROUP BY split").fetchall())
    parts = []
    if pending.get("unlabeled"):
        parts.append(f"{pending['unlabeled']} unlabeled image(s) are not embedded yet and are not in the pool")
    if pending.get("labeled"):
        parts.append(f"{pending['labeled']} labeled image(s) are not embedded yet and do not count as labeled")
    if parts:
        warnings.append("; ".join(parts) + "; re-run build-index to embed them")


def blind_to_novelty(store, pool_ids: np.ndarray, dist: np.ndarray, u: np.ndarray, beta: float, picks: np.ndarray,
                     warnings: list[str]) -> None:
    """Warn when hybrid passed over many of the images farthest from the labeled set
    because they have the pool's lowest score: u is min-max scaled, so those weigh 0 and
    are never picked while anything else is uncovered. A detector blind in a new domain
    gives all its images that score (no box in any pass scores 0), which is just where
    coverage matters; kcenter picks by distance alone."""
    b = len(picks)
    if beta == 0 or b == 0 or not np.isfinite(dist).all() or u.max() == u.min():
        return
    far = np.argpartition(-dist, b - 1)[:b] if b < len(dist) else np.arange(len(dist))  # the b most novel
    blind = far[(u[far] == u.min()) & ~np.isin(far, picks)]
    if len(blind) >= max(2, b // 20):
        example = store.describe([int(pool_ids[blind[0]])])[int(pool_ids[blind[0]])]
        warnings.append(f"{len(blind)} of the {b} unlabeled images farthest from the labeled set have the pool's lowest "
                        f"uncertainty ({u.min():.4g}), so hybrid weighs them 0 and did not pick them (e.g. "
                        f"{example[1] or example[0]}); a detector blind to a new domain scores its images that low "
                        f"(no box in any pass is 0): compare with --strategy kcenter, which picks by distance alone")


def select(root: Path, cfg: SelectCfg, progress_factory: Callable[..., Callable[[int], object]] | None = None) -> SelectResult:
    """Pick cfg.budget images and record the run. progress_factory(total, desc, unit), when
    given, returns a function told the work just done: pool rows ("nearest-labeled", "img")
    during the first pass, then images picked ("picking", "pick")."""
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
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda asked for but torch sees no CUDA device")
    t0 = time.monotonic()
    warnings: list[str] = []
    with open_store(root, writable=True) as store:
        pool_ids, pool, excluded = store.pool()  # [n] int64, [n, d] float16: embedded, unlabeled, not excluded
        if len(pool_ids) == 0:
            why = f" ({excluded} excluded)" if excluded else ""
            raise ConfigError(f"index {root} has no embedded unlabeled images to select from{why}")
        lab_ids, labeled = store.vectors("labeled")  # [m], [m, d]
        budget = cfg.budget
        if budget > len(pool_ids):
            warnings.append(f"budget {budget} exceeds the {len(pool_ids)} unlabeled images; selecting them all")
            budget = len(pool_ids)
        not_embedded(store, warnings)
        # a run that scores no pool image is worth a warning only where uncertainty would be used
        uses_u = cfg.strategy is None or cfg.strategy in strategies.USES_UNCERTAINTY
        u, u_info = pool_uncertainty(store, pool_ids, warnings if uses_u else [])
        name = cfg.strategy or strategies.default_strategy(u is not None)
        strategies.check_ready(name, u is not None)
        measured = None if u is None else ~np.isnan(u)  # [n] images with a score of their own
        if u is not None:
            u = filled_uncertainty(u, name, warnings)
        if name == "novelty" and not len(lab_ids):
            warnings.append("no labeled image: no image has a distance to the labeled set, so novelty ranks nothing "
                            "and takes the first images by id; kcenter covers the pool instead")
        radius = cfg.radius if cfg.radius is not None else scores.default_radius(labeled)
        t1 = time.monotonic()
        first_bar = progress_factory(len(pool_ids), "nearest-labeled", "img") if progress_factory and len(lab_ids) else None
        nearest = scores.nearest_labeled(pool, labeled, radius=radius, cfg=scores.NearestCfg(approximate=cfg.approximate),
                                         progress=first_bar)
        t2 = time.monotonic()
        from .kcenter import KCenterCfg

        bar: dict = {"update": None, "done": 0}

        def tick(k: int) -> None:  # the bar starts at the first pick
            if bar["update"] is None:
                bar["update"] = progress_factory(budget, "picking", "pick")
            bar["done"] += k
            bar["update"](k)

        x = strategies.SelectionInput(pool, labeled, budget, nearest, u, cfg.beta, cfg.seed, KCenterCfg(device=cfg.device),
                                      progress=tick if progress_factory else None)
        sel = strategies.get_strategy(name)(x)
        if name == "hybrid":
            blind_to_novelty(store, pool_ids, nearest.dist, u, cfg.beta, sel.picks, warnings)
        if progress_factory and bar["done"] < len(sel.picks):
            tick(len(sel.picks) - bar["done"])  # strategies that pick all at once
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
                "uncertainty": float(u[p]) if measured is not None and measured[p] else None,
                "nearest_labeled_id": meta[int(lab_ids[li])][0] if li >= 0 else None,
                "nearest_labeled_distance": float(nearest.dist[p]) if li >= 0 else None,
                "labeled_neighbors": int(nearest.count[p]) if nearest.count is not None else None,
                "distance_at_pick": float(sel.dist_at_pick[rank - 1]) if sel.dist_at_pick is not None else None,
            })
        missing = [r["path"] for r in rows if r["path"] is not None and not os.path.isfile(r["path"])]
        if missing:
            warnings.append(f"{len(missing)} of the {len(rows)} picks are not files now (e.g. {missing[0]}): deleted or "
                            f"moved since build-index read them; re-run build-index on their folders, then select again")
        redundant = float(np.mean(nearest.count > 0)) if nearest.count is not None else 0.0
        summary = {
            "strategy": name,
            "picks": len(picks),
            "pool": len(pool_ids),
            "excluded": excluded,
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
            log.debug("warning: %s", w)  # the CLI prints SelectResult.warnings itself, once its bars are closed
        return SelectResult(rows, summary, run, warnings)
