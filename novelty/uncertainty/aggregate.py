"""Registry of aggregations: per-object uncertainty scores [K] -> one image score.

    max        the most uncertain object decides (default): one doubtful object is
               enough to make an image worth labelling, however many easy ones it holds
    mean       average over objects: favours images where everything is doubtful
    sum        grows with the number of doubtful objects (unbounded)
    topk-mean  mean of the k highest (k configurable; all objects when fewer than k)

An image with no objects never reaches an aggregation: the caller decides what it
scores (see ``DetectionCfg.empty_score``).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import ConfigError

Aggregation = Callable[[np.ndarray], float]


def _max(s: np.ndarray) -> float:
    return float(np.max(s))


def _mean(s: np.ndarray) -> float:
    return float(np.mean(s))


def _sum(s: np.ndarray) -> float:
    return float(np.sum(s))


def _topk_mean(k: int) -> Aggregation:
    def topk_mean(s: np.ndarray) -> float:
        kk = min(k, s.shape[0])
        return float(np.partition(s, s.shape[0] - kk)[s.shape[0] - kk:].mean())

    return topk_mean


# name -> factory(k) -> aggregation; only topk-mean uses k
_AGGREGATIONS: dict[str, Callable[[int], Aggregation]] = {
    "max": lambda k: _max,
    "mean": lambda k: _mean,
    "sum": lambda k: _sum,
    "topk-mean": _topk_mean,
}


def list_aggregations() -> list[str]:
    return list(_AGGREGATIONS)


def get_aggregation(name: str, k: int = 3) -> Aggregation:
    """The aggregation called ``name``: a function scores [K] (K >= 1) -> float."""
    if name not in _AGGREGATIONS:
        raise ConfigError(f"unknown aggregation {name!r}; valid: {', '.join(_AGGREGATIONS)}")
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"topk (--topk) must be a positive integer, got {k!r}")
    return _AGGREGATIONS[name](k)
