"""Selection strategies: a registry of functions (SelectionInput) -> Selection.

    kcenter      pure coverage: k-center greedy from the labeled set (Sener & Savarese 2018)
    hybrid       k-center greedy maximising u^beta * d (u scaled to [0, 1])
    novelty      the B images farthest from the labeled set
    uncertainty  the B images the detector is least sure about
    random       a seeded uniform baseline
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError


@dataclass
class SelectionInput:
    pool: np.ndarray  # [n, d] float16, unit rows
    labeled: np.ndarray  # [m, d] float16
    budget: int
    nearest: object  # scores.NearestResult for the pool
    uncertainty: np.ndarray | None = None  # [n] >= 0, or None
    beta: float = 1.0
    seed: int = 0
    kcenter_cfg: object = None
    progress: Callable[[int], object] | None = None  # called with 1 after each k-center pick


@dataclass
class Selection:
    picks: np.ndarray  # [B] int64 indices into the pool, in pick order
    priority: np.ndarray  # [B] what the strategy maximised at each pick (float64 for scores as given)
    radius_trace: np.ndarray | None = None  # [B] covering radius after each pick (k-center)
    dist_at_pick: np.ndarray | None = None  # [B] distance to the nearest labeled-or-picked at pick time


def uncertainty_weights(u: np.ndarray, beta: float) -> np.ndarray:
    """u scaled to [0, 1] by min-max over the pool, raised to beta. All-equal u -> ones."""
    u = np.asarray(u, dtype=np.float64)
    span = u.max() - u.min()
    s = (u - u.min()) / span if span > 0 else np.ones_like(u)
    return (s ** beta).astype(np.float32)


def top(scores: np.ndarray, budget: int) -> np.ndarray:
    """Indices of the `budget` largest scores, largest first, ties toward the lower index."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, dtype=np.float64)))
    return order[:budget]


def check_ready(name: str, has_uncertainty: bool) -> None:
    """Refuse, before any work, a strategy whose inputs are missing."""
    if name in USES_UNCERTAINTY and not has_uncertainty:
        raise ConfigError(f"strategy {name!r} needs uncertainty scores: run `novelty uncertainty` or `novelty import-uncertainty` first")


def _need_uncertainty(x: SelectionInput, name: str) -> np.ndarray:
    check_ready(name, x.uncertainty is not None)
    return x.uncertainty


def kcenter(x: SelectionInput, weights: np.ndarray | None = None) -> Selection:
    from .kcenter import KCenterCfg, kcenter_greedy

    r = kcenter_greedy(x.pool, x.labeled, x.budget, weights, cfg=x.kcenter_cfg or KCenterCfg(), nearest=x.nearest,
                       progress=x.progress)
    return Selection(r.picks, r.priority, r.radius_trace, r.dist_at_pick)


def hybrid(x: SelectionInput) -> Selection:
    return kcenter(x, uncertainty_weights(_need_uncertainty(x, "hybrid"), x.beta))


def novelty(x: SelectionInput) -> Selection:
    d = x.nearest.dist
    picks = top(d, x.budget)
    return Selection(picks, d[picks].astype(np.float32))


def uncertainty(x: SelectionInput) -> Selection:
    u = _need_uncertainty(x, "uncertainty")
    picks = top(u, x.budget)
    return Selection(picks, u[picks].astype(np.float64))  # the score as given: 0.9, not float32's 0.8999999761581421


def random(x: SelectionInput) -> Selection:
    rng = np.random.default_rng(x.seed)
    picks = rng.permutation(len(x.pool))[: x.budget].astype(np.int64)
    return Selection(picks, np.full(len(picks), np.nan, np.float32))


_STRATEGIES: dict[str, Callable[[SelectionInput], Selection]] = {
    "kcenter": kcenter,
    "hybrid": hybrid,
    "novelty": novelty,
    "uncertainty": uncertainty,
    "random": random,
}


# the strategies that rank by uncertainty; the others only show it in the output
USES_UNCERTAINTY = ("hybrid", "uncertainty")


def list_strategies() -> list[str]:
    return list(_STRATEGIES)


def get_strategy(name: str) -> Callable[[SelectionInput], Selection]:
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; choose one of: {', '.join(_STRATEGIES)}") from None


def default_strategy(has_uncertainty: bool) -> str:
    return "hybrid" if has_uncertainty else "kcenter"
