"""Segmentation uncertainty from T MC-dropout passes: pure functions, arrays in, scores out.

Per pixel, from the T softmax maps [T, C, H, W]: predictive entropy and BALD (mutual
information), both divided by log C, so in [0, 1] (``heuristics.py``).

Per image: the mean of the ``top_percent`` % most uncertain pixels (default 5 %, at
least one pixel), so that a small uncertain object is not averaged away by a large,
confidently classified background.

Which pixel map feeds the image score is ``measure``: ``bald`` (default) or
``entropy``. BALD is the disagreement between the passes that MC dropout is there to
measure; entropy is also high wherever the passes agree the pixel is ambiguous, which
for a segmenter means every object boundary, so it ranks images by how much outline
they contain more than by what the model does not know.

Logits go through ``probs_from_logits``: softmax over C, or for a single channel
(a sigmoid segmenter) the two-class pair [1 - sigmoid, sigmoid].

Numpy arrays and torch tensors are both accepted (the runner reduces on the device).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .heuristics import _is_torch, bald, entropy

MEASURES = ("bald", "entropy")


@dataclass(frozen=True)
class SegmentationCfg:
    measure: str = "bald"  # bald | entropy: the pixel map behind the image score
    top_percent: float = 5.0  # image score = mean of this % most uncertain pixels

    def __post_init__(self):
        if self.measure not in MEASURES:
            raise ConfigError(f"unknown segmentation measure {self.measure!r}; valid: {', '.join(MEASURES)}")
        if not 0.0 < self.top_percent <= 100.0:
            raise ConfigError(f"top_percent (--top-percent) must be in (0, 100], got {self.top_percent}")


def probs_from_logits(logits, class_axis: int = 1):
    """Softmax over classes; one channel -> [1 - sigmoid, sigmoid]."""
    if _is_torch(logits):
        import torch

        if logits.shape[class_axis] == 1:
            p = torch.sigmoid(logits.float())
            return torch.cat([1.0 - p, p], class_axis)
        return torch.softmax(logits.float(), class_axis)
    x = np.asarray(logits, dtype=np.float64)
    if x.shape[class_axis] == 1:
        p = 1.0 / (1.0 + np.exp(-x))
        return np.concatenate([1.0 - p, p], class_axis)
    e = np.exp(x - x.max(class_axis, keepdims=True))
    return e / e.sum(class_axis, keepdims=True)


def pixel_maps(probs):
    """[T, C, H, W] (or [T, B, C, H, W]) -> (entropy, bald), each [H, W] (or [B, H, W])."""
    if probs.ndim not in (4, 5):
        raise ConfigError(f"segmentation probs must be [T, C, H, W] or [T, B, C, H, W], got {tuple(probs.shape)}")
    kw = dict(class_axis=probs.ndim - 3, pass_axis=0, normalize=True)
    return entropy(probs, **kw), bald(probs, **kw)


def top_percent_mean(values, percent: float):
    """Mean of the top ``percent`` % of the last two axes: [..., H, W] -> [...]."""
    flat = values.reshape(*values.shape[:-2], -1)
    n = flat.shape[-1]
    k = max(1, math.ceil(n * percent / 100.0))
    if _is_torch(flat):
        return flat.topk(k, dim=-1).values.mean(-1)
    return np.partition(flat, n - k, axis=-1)[..., n - k:].mean(-1)


def segmentation_scores(probs, cfg: SegmentationCfg = SegmentationCfg()) -> dict[str, np.ndarray]:
    """Batch of images: [T, B, C, H, W] -> {'score', 'entropy', 'bald'}, each [B] float64.
    'entropy' and 'bald' are the top-percent means of each map; 'score' is the chosen one."""
    if probs.ndim != 5:
        raise ConfigError(f"expected [T, B, C, H, W] probabilities, got {tuple(probs.shape)}")
    ent, mi = pixel_maps(probs)  # [B, H, W] each
    out = {}
    for name, m in (("entropy", ent), ("bald", mi)):
        v = top_percent_mean(m, cfg.top_percent)
        out[name] = (v.double().cpu().numpy() if _is_torch(v) else np.asarray(v, np.float64))
    out["score"] = out[cfg.measure]
    return out


def segmentation_score(probs, cfg: SegmentationCfg = SegmentationCfg()) -> float:
    """One image's uncertainty from its T softmax maps [T, C, H, W]."""
    if probs.ndim != 4:
        raise ConfigError(f"expected [T, C, H, W] probabilities, got {tuple(probs.shape)}")
    return float(segmentation_scores(probs[:, None], cfg)["score"][0])


def segmentation_score_from_logits(logits, cfg: SegmentationCfg = SegmentationCfg()) -> float:
    """One image's uncertainty from its T logit maps [T, C, H, W]."""
    return segmentation_score(probs_from_logits(logits, class_axis=1), cfg)
