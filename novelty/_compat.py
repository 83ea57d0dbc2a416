"""Environment workarounds, each explained. Import this before open_clip or timm.

torchvision on a CPU-only torch
-------------------------------
On machines without CUDA we pin the CPU build of torch (see ``constraints.txt``), but
the only torchvision wheels published for torch 2.13 are CUDA builds. Their compiled
ops (``torchvision._C``) cannot load on the CPU torch, and ``import torchvision`` then
dies in ``torchvision/_meta_registrations.py``::

    RuntimeError: operator torchvision::nms does not exist      (pytorch/vision#9085)

because it registers fake kernels for ops whose schemas only the compiled library
defines. open_clip (and timm) import torchvision for its pure-Python transforms, which
is all novelty needs: we never call nms or roi_align.

``import_torchvision`` acts only on that exact error. It then defines placeholder
schemas for the ops that module registers fakes for (``nms``, ``qnms``) through
``torch.library`` and imports again. The placeholders have no kernel: calling them
raises torch's own "no kernel" error rather than computing anything wrong. A machine
whose torchvision loads (any CUDA torch, or a matching CPU pair) never reaches that
branch, and any other import error is raised unchanged.
"""
from __future__ import annotations

import contextlib
import logging
import re
import sys

log = logging.getLogger(__name__)

# Schemas as torchvision's csrc/ops/*.cpp declares them.
_PLACEHOLDER_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")
_placeholder_lib = None  # keep the Library alive: dropping it unregisters the schemas
patched = False  # True once the placeholder branch ran in this process


def _forget_partial_import() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision():
    """Import torchvision, working around a CPU torch paired with a CUDA torchvision."""
    global _placeholder_lib, patched
    try:
        import torchvision
        return torchvision
    except RuntimeError as e:
        m = _MISSING_OP.search(str(e))
        if m is None or m.group(1) not in _PLACEHOLDER_SCHEMAS:
            raise
        import torch

        _forget_partial_import()
        if _placeholder_lib is None:
            _placeholder_lib = torch.library.Library("torchvision", "DEF")
            for schema in _PLACEHOLDER_SCHEMAS.values():
                _placeholder_lib.define(schema)
        patched = True
        log.debug("torchvision's compiled ops did not load (%s); placeholder schemas defined", e)
        import torchvision
        return torchvision


def import_open_clip():
    """Import open_clip after making sure torchvision imports."""
    import_torchvision()
    import open_clip
    return open_clip


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
# glibc's dynamic thresholds rise at most to these (64-bit): the mmap threshold to 32 MB,
# the trim threshold to twice it
DYNAMIC_MMAP_MAX, DYNAMIC_TRIM_MAX = 32 << 20, 64 << 20


def _mallopt(param: int, value: int) -> bool:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(param, value))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def bounded_heap(threshold: int = 128 * 1024):
    """Keep a long embedding run's memory flat while inside (glibc only; a no-op elsewhere).

    glibc raises its mmap threshold every time a large block allocated with mmap is
    freed, so after the first few batches the per-image buffers (decoded pixels,
    input tensors) come from the heap instead, and the heap fragments: measured here,
    RSS grew ~30 KB per image, without bound. Pinning M_MMAP_THRESHOLD turns that
    dynamic adjustment off and large buffers go back to the OS when freed
    (benchmarks/embed_throughput.py prints peak RSS at n and 2n).

    The pin is process-wide and glibc cannot return to its dynamic rule once a
    threshold is set, so on exit the thresholds are set to the most that rule reaches
    (32 MB, trim 64 MB). Left pinned at 128 KB, every later allocation above it is a
    fresh mmap and its page faults: training the active-learning benchmark's U-Net in
    the same process ran 1.8x slower (10.4 s against 5.8 s, half of it system time);
    with the values set on exit it ran in 5.1 s."""
    pinned = _mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield pinned
    finally:
        if pinned:
            _mallopt(M_MMAP_THRESHOLD, DYNAMIC_MMAP_MAX)
            _mallopt(M_TRIM_THRESHOLD, DYNAMIC_TRIM_MAX)
