"""novelty: choose which unlabeled images to label next.

The public Python API, for users who script the pipeline or run their own inference:

    build_index(root, labeled, unlabeled, BuildCfg())      embed sources into an index
    open_store(root) / create_store(root)                   the catalog + float16 shards
    select(root, SelectCfg(budget=5000))                     pick images, record the run
    nearest_labeled, default_radius                          scores over arrays
    kcenter_greedy, kcenter_plain                            exact k-center greedy over arrays
    list_strategies / get_strategy                           the strategy registry
    novelty.uncertainty                                      MC-dropout scores (BALD, entropy, ...)

Heavy libraries (torch, open_clip, faiss) load on first use, not on import.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "BuildCfg": "config", "EncoderCfg": "config", "ReaderCfg": "config",
    "build_index": "indexer", "BuildSummary": "indexer",
    "open_store": "store", "create_store": "store", "Store": "store",
    "SelectCfg": "selection", "select": "selection",
    "list_strategies": "strategies", "get_strategy": "strategies",
    "nearest_labeled": "scores", "default_radius": "scores",
    "kcenter_greedy": "kcenter", "kcenter_plain": "kcenter", "KCenterCfg": "kcenter",
    "create_encoder": "encoder",
    "NoveltyError": "errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
