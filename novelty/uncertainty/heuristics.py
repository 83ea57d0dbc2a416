"""Generic MC-dropout heuristics: pure functions on class probabilities.

Layout follows baal: ``probs`` is ``[n, C, T]`` (n samples, C classes, T stochastic
passes), optionally with extra axes between classes and passes (``[n, C, H, W, T]``
for pixels). ``class_axis`` and ``pass_axis`` select other layouts. Numpy arrays and
torch tensors are both accepted; the result has the input's type (a tensor stays on
its device, so pixel maps can be reduced on the GPU).

    entropy(p) = H(mean_t p_t)                    predictive entropy
    bald(p)    = H(mean_t p_t) - mean_t H(p_t)    mutual information (Houlsby et al. 2011)

with ``H(q) = -sum_c q_c log q_c`` in nats. ``normalize=True`` divides by ``log C`` so
both lie in [0, 1]. BALD is zero when every pass predicts the same distribution, however
flat, so it measures disagreement between passes; entropy also counts uncertainty the
passes agree on. ``binary_entropy`` is the two-class entropy in bits (1 at p = 0.5).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError

EPS = 1e-12


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _neg_plogp_sum(p, axis: int):
    """-sum p log p along axis (0 log 0 = 0)."""
    if _is_torch(p):
        import torch

        return -(p * torch.log(p.clamp_min(EPS))).sum(axis)
    return -(p * np.log(np.maximum(p, EPS))).sum(axis)


def _prepare(probs, class_axis: int, pass_axis: int):
    if not _is_torch(probs):
        probs = np.asarray(probs, dtype=np.float64)
    nd = probs.ndim
    if nd < 2:
        raise ConfigError(f"probs must have a class and a pass axis, got shape {tuple(probs.shape)}")
    c, t = class_axis % nd, pass_axis % nd
    if c == t:
        raise ConfigError(f"class_axis and pass_axis must differ, both are {c}")
    return probs, c, t


def _entropy_of_mean(probs, c: int, t: int):
    mean = probs.mean(t)  # pass axis gone
    return _neg_plogp_sum(mean, c - (t < c))


def _mean_entropy(probs, c: int, t: int):
    return _neg_plogp_sum(probs, c).mean(t - (c < t))


def entropy(probs, *, class_axis: int = 1, pass_axis: int = -1, normalize: bool = False):
    """Predictive entropy: [n, C, ..., T] -> [n, ...]."""
    probs, c, t = _prepare(probs, class_axis, pass_axis)
    h = _entropy_of_mean(probs, c, t)
    return h / math.log(probs.shape[c]) if normalize and probs.shape[c] > 1 else h


def bald(probs, *, class_axis: int = 1, pass_axis: int = -1, normalize: bool = False):
    """BALD mutual information: [n, C, ..., T] -> [n, ...], >= 0."""
    probs, c, t = _prepare(probs, class_axis, pass_axis)
    mi = _entropy_of_mean(probs, c, t) - _mean_entropy(probs, c, t)
    mi = mi.clamp_min(0.0) if _is_torch(mi) else np.maximum(mi, 0.0)
    return mi / math.log(probs.shape[c]) if normalize and probs.shape[c] > 1 else mi


def binary_entropy(p) -> np.ndarray:
    """Entropy of a Bernoulli(p) in bits: 0 at p in {0, 1}, 1 at p = 0.5."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    q = 1.0 - p
    return np.maximum(-(p * np.log2(np.maximum(p, EPS)) + q * np.log2(np.maximum(q, EPS))), 0.0)
