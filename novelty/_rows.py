"""Stored rows -> unit float32 rows: the one conversion every distance path uses.

Vectors are stored as float16 with rows of (about) unit length. Every path (the
brute-force references, the pruned exact paths, the torch loop) first turns a row
into float32 and multiplies it by the float32 inverse of its own norm, computed here
row by row. The cast is exact and the product is elementwise, so a row comes out
bit-identical whether it is read in a block, a slice or a gather: all paths see the
same data. A zero row stays zero (distance 1 to everything).

Cosine distance between unit rows is 1 - x.y = ||x - y||^2 / 2; the pruned paths
state their triangle-inequality bounds in Euclidean distance and convert.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

BLOCK = 16384  # rows per block: 32 MiB of float32 at d = 512
SMALL = 1 << 15  # elements below which numpy's cast beats torch's call overhead


def cast_f32(x: np.ndarray) -> np.ndarray:
    """Rows [b, d] (float16 or float32) -> a new float32 C-contiguous array [b, d].

    float16 goes through torch, whose vectorised cast is ~15x faster than numpy's."""
    if x.dtype == np.float32:
        return np.array(x, dtype=np.float32, order="C", copy=True)
    if x.dtype != np.float16 or x.size < SMALL:
        return np.ascontiguousarray(x, dtype=np.float32)
    import torch

    out = np.empty(x.shape, np.float32)
    torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(x)))
    return out


@contextmanager
def torch_threads(n: int | None):
    """Run a block with torch limited to n threads (None: leave as is).

    numpy's OpenBLAS threads spin for a while after each product; torch's OpenMP
    threads starting meanwhile on the same cores run ~10x slower. Code that interleaves
    numpy products with torch calls (casts) runs torch on one thread; code that is torch
    only keeps all of them. Imports torch."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch
    finally:
        torch.set_num_threads(before)


def row_inv_norms(x: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """[n] float32: 1 / ||row|| computed in float32 (0 for a zero row), block-wise."""
    inv = np.empty(len(x), np.float32)
    for s in range(0, len(x), block):
        b = cast_f32(x[s:s + block])  # [b, d]
        n2 = np.einsum("ij,ij->i", b, b)  # row by row: independent of the block
        with np.errstate(divide="ignore"):
            v = np.float32(1.0) / np.sqrt(n2)
        v[n2 == 0] = 0.0
        inv[s:s + block] = v
    return inv


def unit_rows(x: np.ndarray, inv: np.ndarray, rows=None) -> np.ndarray:
    """Unit float32 rows of x: x[rows] (a slice, an index array, or all) times inv[rows]."""
    sel = slice(None) if rows is None else rows
    b = cast_f32(x[sel])  # [b, d]
    b *= inv[sel][:, None]
    return b


def unit_float32(x: np.ndarray) -> np.ndarray:
    """Unit float32 rows of a small array [b, d] (the same values the block paths see)."""
    x = np.asarray(x)
    return unit_rows(x, row_inv_norms(x))


def check_rows(x: np.ndarray, name: str) -> np.ndarray:
    """A 2-d float16/float32 array, C-contiguous (a view when it already is)."""
    from .errors import ConfigError

    x = np.asarray(x)
    if x.ndim != 2:
        raise ConfigError(f"{name} must be a 2-d array [n, d], got shape {x.shape}")
    if x.dtype not in (np.float16, np.float32):
        x = x.astype(np.float32)
    return np.ascontiguousarray(x)
