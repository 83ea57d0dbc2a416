"""Where is a detector or segmenter unsure? Disagreement between MC-dropout passes
(Gal & Ghahramani 2016).

    heuristics    entropy, bald on [n, C, T] probabilities (baal's layout)
    detection     match boxes across passes; presence, class, localisation terms
    segmentation  per-pixel entropy/BALD, top-k % mean per image
    aggregate     registry of object -> image aggregations
    mc            seeded MC-dropout sampling, T passes in one batched forward
    inject        opt-in dropout before a model's head layers
    model         load ``module:factory`` / ``file.py:factory`` specs
    runner        batches of (keys, images) -> per-image scores and failures

The scoring modules need only numpy; the names from mc, inject, model and runner
import torch on first use.
"""
from __future__ import annotations

import importlib

from .aggregate import get_aggregation, list_aggregations
from .detection import DetectionCfg, DetectionObjects, box_iou, detection_objects, detection_score, image_score, match_detections
from .heuristics import bald, binary_entropy, entropy
from .segmentation import (
    SegmentationCfg,
    pixel_maps,
    probs_from_logits,
    segmentation_score,
    segmentation_score_from_logits,
    segmentation_scores,
    top_percent_mean,
)

_LAZY = {
    "DROPOUT_TYPES": "mc", "MCDropout": "mc", "find_dropout": "mc", "mc_forward": "mc", "per_image": "mc",
    "HEAD_NAMES": "inject", "head_layers": "inject", "inject_dropout": "inject",
    "default_preprocess": "model", "load_model_spec": "model",
    "ImageResult": "runner", "UncertaintyCfg": "runner", "prepare_model": "runner", "score_batches": "runner",
    "KINDS": "runner", "auto_rows": "runner",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "bald", "binary_entropy", "entropy",
    "DetectionCfg", "DetectionObjects", "box_iou", "detection_objects", "detection_score", "image_score",
    "match_detections",
    "SegmentationCfg", "pixel_maps", "probs_from_logits", "segmentation_score", "segmentation_score_from_logits",
    "segmentation_scores", "top_percent_mean",
    "get_aggregation", "list_aggregations",
    *_LAZY,
]
