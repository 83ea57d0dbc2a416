"""Load a user's detector or segmenter from a spec: ``package.module:factory`` or
``path/to/file.py:factory``.

The contract
------------
``factory`` is called with no arguments (a dotted name after the colon, e.g.
``models:Detector.create``, is followed attribute by attribute) and returns either

- an ``nn.Module``, or
- a pair ``(model, preprocess)`` where ``preprocess`` maps a PIL RGB image to a float
  tensor [3, H, W], the model's input for that image.

Weights are the factory's business (load a checkpoint inside it). novelty moves the
model to the device, puts it in eval mode and runs MC dropout on it (``mc.py``).

What the model returns, called on a batch (a tensor [B, 3, H, W], or a list of B
tensors [3, H, W] when the images differ in size):

- detection: torchvision's convention, a list of B dicts with ``boxes`` [N, 4] (xyxy,
  pixels), ``scores`` [N], ``labels`` [N], and optionally ``probs`` [N, C], the full
  class distribution of each box, used for the class uncertainty when present;
- segmentation: logits [B, C, H', W'] (C = 1 means a sigmoid output), or a dict
  whose ``out`` entry holds them (torchvision's segmenters).

Without a preprocess, ``default_preprocess(size)`` is used: RGB to a float tensor in
[0, 1], no normalisation (torchvision detectors normalise inside the model), resized
to ``size`` (an int for a square, or (height, width)) only when one is given. Detection
models usually take images of any size; fixed-size batches need ``size``.

Modules are imported with the current directory on ``sys.path`` (the console script
does not put it there); a file's own directory is on ``sys.path`` while it is imported
and its factory runs, so it can import its neighbours.

torchvision, when installed, is imported through ``_compat.import_torchvision`` before
the spec's module, so a model built from torchvision's pure-Python parts loads on a
CPU torch paired with a CUDA torchvision. Its compiled ops still do not run there:
torchvision's detectors call ``nms`` inside their forward, and each image then fails
with torchvision's "Couldn't load custom C++ ops" error, recorded as its reason.

Every failure raises with a one-line message naming the spec: a spec that names
nothing (no colon, a missing module, file or attribute) a ConfigError, exit 2 like any
bad argument; one that exists but cannot be used (an import that fails, a factory that
raises or returns the wrong thing) a ModelError, exit 4.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError, ModelError, first_line

log = logging.getLogger(__name__)


@contextmanager
def _on_path(folder: str):
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _import_file(spec: str, path: Path):
    if not path.is_file():
        raise ConfigError(f"model spec {spec!r}: file {path} does not exist")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"_novelty_model_{path.stem}_{digest}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ModelError(f"model spec {spec!r}: cannot import {path}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up there
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ModelError(f"model spec {spec!r}: importing {path} failed: {first_line(e)}") from e
    return module


def _import_module(spec: str, name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise ConfigError(f"model spec {spec!r}: no module named {e.name!r}") from e
        raise ModelError(f"model spec {spec!r}: importing {name} failed: {first_line(e)}") from e
    except Exception as e:
        raise ModelError(f"model spec {spec!r}: importing {name} failed: {first_line(e)}") from e


def _import_torchvision() -> None:
    """torchvision with _compat's workaround, before a spec can import it on its own.
    Absent or broken otherwise, it is left alone: a model that does not use it still
    loads, and one that does fails on its own import, with a message naming the spec."""
    if importlib.util.find_spec("torchvision") is None:
        return
    from .._compat import import_torchvision

    try:
        import_torchvision()
    except Exception as e:
        log.debug("torchvision did not import (%s); a model spec that needs it will fail", first_line(e))


def load_model_spec(spec: str, size: int | tuple[int, int] | None = None) -> tuple:
    """``module:factory`` or ``file.py:factory`` -> (model, preprocess). ``size`` is
    passed to ``default_preprocess`` when the factory gives no preprocess."""
    from torch import nn

    where, colon, attr = spec.rpartition(":")
    if not colon or not where or not attr:
        raise ConfigError(f"model spec {spec!r}: expected 'package.module:factory' or 'path/to/file.py:factory'")
    _import_torchvision()
    is_file = where.endswith(".py") or "/" in where or os.sep in where
    folder = str(Path(where).resolve().parent) if is_file else os.getcwd()
    with _on_path(folder):
        module = _import_file(spec, Path(where)) if is_file else _import_module(spec, where)
        factory = module
        for part in attr.split("."):
            if not hasattr(factory, part):
                raise ConfigError(f"model spec {spec!r}: {where} has no attribute {attr!r}")
            factory = getattr(factory, part)
        if not callable(factory):
            raise ModelError(f"model spec {spec!r}: {attr} is a {type(factory).__name__}, not a callable factory")
        try:
            made = factory()
        except Exception as e:
            raise ModelError(f"model spec {spec!r}: the factory raised {first_line(e)}") from e
    if isinstance(made, nn.Module):
        return made, default_preprocess(size)
    if isinstance(made, (tuple, list)) and len(made) == 2 and isinstance(made[0], nn.Module) and callable(made[1]):
        return made[0], made[1]
    raise ModelError(f"model spec {spec!r}: the factory returned {type(made).__name__}; "
                     "expected an nn.Module or a (model, preprocess) pair")


class default_preprocess:  # noqa: N801 - a picklable function factory (DataLoader workers)
    """PIL image -> float32 tensor [3, H, W] in [0, 1]; resized (bilinear) to ``size``
    (int: square; (height, width)) when given, else at its own size."""

    def __init__(self, size: int | tuple[int, int] | None = None):
        self.size = (size, size) if isinstance(size, int) else (None if size is None else tuple(size))

    def __call__(self, img):
        import numpy as np
        import torch
        from PIL import Image

        img = img.convert("RGB")
        if self.size is not None and (img.height, img.width) != self.size:
            img = img.resize((self.size[1], self.size[0]), Image.BILINEAR)
        a = np.asarray(img, dtype=np.float32) / 255.0  # [H, W, 3]
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return f"default_preprocess(size={self.size})"
