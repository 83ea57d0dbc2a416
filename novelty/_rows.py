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

# rows per block: 16 MiB of float32 at d = 512. Temporaries under glibc's largest mmap
# threshold (32 MiB) are recycled by malloc; larger ones are fresh pages every time,
# and faulting those in costs as much as the arithmetic on them.
BLOCK = 8192
SMALL = 1 << 15  # elements below which numpy's cast beats torch's call overhead
BIG_PRODUCT = 1 << 28  # multiply-adds from which a bf16 product gets all torch threads


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


_TORCH_DEFAULT: list[int] = []  # torch's thread count before novelty first changed it


@contextmanager
def torch_threads(n: int | None):
    """Run a block with torch on n threads (None: torch's own default). Imports torch.

    The pruned paths run torch on one thread but for their large products (bf16_mm):
    OpenMP threads wait for each other at the end of every operation, and when another
    process holds a core each small operation can wait a whole scheduler time slice,
    which made them 10x slower on a busy 2-core machine. Numpy's OpenBLAS threads also
    spin after each product and slow torch threads starting meanwhile (see blas_threads)."""
    import torch

    before = torch.get_num_threads()
    if not _TORCH_DEFAULT:
        _TORCH_DEFAULT.append(before)
    torch.set_num_threads(_TORCH_DEFAULT[0] if n is None else n)
    try:
        yield torch
    finally:
        torch.set_num_threads(before)


_BLAS = []  # [set_num_threads, get_num_threads] of numpy's OpenBLAS, once found


def _openblas():
    if not _BLAS:
        import ctypes

        np.ones(2) @ np.ones(2)  # loads numpy's BLAS
        fns = None
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
        for path in paths:
            lib = ctypes.CDLL(path)
            for pre in ("scipy_openblas_", "openblas_"):
                for suf in ("64_", ""):
                    if hasattr(lib, f"{pre}set_num_threads{suf}") and hasattr(lib, f"{pre}get_num_threads{suf}"):
                        fns = (getattr(lib, f"{pre}set_num_threads{suf}"), getattr(lib, f"{pre}get_num_threads{suf}"))
                        break
                if fns:
                    break
            if fns:
                break
        _BLAS.append(fns)
        _BLAS.append(fns[1]() if fns else 1)  # the process default, e.g. from OPENBLAS_NUM_THREADS
    return _BLAS[0]


@contextmanager
def blas_threads(n: int | None):
    """Run a block with numpy's OpenBLAS on n threads (None: the process default). Loops
    of small products run faster on one: two threads spend more on handing work over
    than they save, and fall to a tenth of their speed when another process holds a
    core. A no-op where numpy's BLAS is not an OpenBLAS that can be found (Linux
    /proc/self/maps)."""
    try:
        fns = _openblas()
    except OSError:
        fns = None
    if fns is None:
        yield
        return
    set_n, get_n = fns
    before = get_n()
    set_n(_BLAS[1] if n is None else n)
    try:
        yield
    finally:
        set_n(before)


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


def bf16_bits(X) -> np.ndarray:
    """float32 [...] -> uint16 [...]: the bfloat16 nearest to each value (ties to even),
    the bits of torch's .to(torch.bfloat16) (which does large arrays ~10x faster)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.size >= SMALL:
        import torch

        out = np.empty(X.shape, np.uint16)
        torch.from_numpy(out).view(torch.bfloat16).copy_(torch.from_numpy(X))
        return out
    u = X.view(np.uint32)
    return ((u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16).astype(np.uint16)


def bf16_value(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits -> their float32 values (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class BF16Side:
    """One side of a bf16 screen: the bf16 bits of rows X [b, d] (float32) with an offset
    column (padded to a multiple of 16 columns), and what the error bound on their
    products needs: dx = |x~ - x|, nx = |x|, nxb = |x~| (float64, per row) and the
    offsets as rounded to bf16. offset: a scalar or one per row."""

    def __init__(self, X: np.ndarray, offset):
        b, d = X.shape
        bits = bf16_bits(X)
        v = bf16_value(bits)
        err = v - X
        self.dx = np.sqrt(np.einsum("ij,ij->i", err, err)).astype(np.float64)
        self.nx = np.sqrt(np.einsum("ij,ij->i", X, X)).astype(np.float64)
        self.nxb = np.sqrt(np.einsum("ij,ij->i", v, v)).astype(np.float64)
        self.bits = np.zeros((b, (d + 1 + 15) // 16 * 16), np.uint16)
        self.bits[:, :d] = bits
        self.bits[:, d] = bf16_bits(np.broadcast_to(np.asarray(offset, np.float32), (b,)))
        self.offset = bf16_value(self.bits[:, d]).astype(np.float64)


def _bucket(k: int) -> int:
    """Round k up to a power of two (at least 64): few distinct shapes."""
    return max(64, 1 << (int(k) - 1).bit_length())


def bf16_mm(A: np.ndarray, B: np.ndarray, pad_b: bool = False):
    """A [a, k] @ B [b, k].T on bfloat16 bits (uint16) through torch (fp32 accumulation,
    bf16 result) -> torch tensor [a, b]. A's rows (and B's with pad_b) are padded to a
    power of two: oneDNN caches a primitive, and its buffers, per shape, so shapes
    without bound grow memory without bound."""
    import torch

    def padded(M):
        r = _bucket(len(M))
        if r == len(M):
            return torch.from_numpy(np.ascontiguousarray(M)).view(torch.bfloat16)
        P = np.zeros((r, M.shape[1]), np.uint16)
        P[:len(M)] = M
        return torch.from_numpy(P).view(torch.bfloat16)

    Bt = padded(B) if pad_b else torch.from_numpy(np.ascontiguousarray(B)).view(torch.bfloat16)
    At = padded(A)
    if At.shape[0] * Bt.shape[0] * At.shape[1] >= BIG_PRODUCT:
        with torch_threads(None):
            return (At @ Bt.T)[:len(A), :len(B)]
    return (At @ Bt.T)[:len(A), :len(B)]


def check_rows(x: np.ndarray, name: str) -> np.ndarray:
    """A 2-d float16/float32 array, C-contiguous (a view when it already is)."""
    from .errors import ConfigError

    x = np.asarray(x)
    if x.ndim != 2:
        raise ConfigError(f"{name} must be a 2-d array [n, d], got shape {x.shape}")
    if x.dtype not in (np.float16, np.float32):
        x = x.astype(np.float32)
    return np.ascontiguousarray(x)


def unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bitwise-identical rows of x [m, d] collapsed. -> (first [u] ascending index of each
    distinct row's first occurrence, inverse [m] position of each row in `first`, count [u])."""
    if len(x) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    key = np.ascontiguousarray(x).view(np.dtype((np.void, x.dtype.itemsize * x.shape[1])))[:, 0]
    _, first, inverse, count = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
    o = np.argsort(first)  # order the distinct rows by first occurrence
    rank = np.empty_like(o)
    rank[o] = np.arange(len(o))
    return first[o].astype(np.int64), rank[inverse.ravel()].astype(np.int64), count[o].astype(np.int64)


def duplicate_groups(x: np.ndarray, block: int = 1 << 18) -> dict[int, np.ndarray]:
    """Groups of bitwise-identical rows of x [n, d] with more than one member:
    {lowest index: all member indices ascending}. A hash of each row's first 64 bytes
    finds the candidates (fast at n = 1M); full rows decide."""
    n = len(x)
    if n < 2:
        return {}
    words = min(8, x.shape[1] * x.dtype.itemsize // 8)
    mult = np.random.default_rng(0).integers(1, 2**63, words, dtype=np.uint64) | np.uint64(1)
    h = np.empty(n, np.uint64)
    for s in range(0, n, block):
        b = np.ascontiguousarray(x[s:s + block]).view(np.uint8)[:, :8 * words].copy().view(np.uint64)
        h[s:s + block] = (b * mult).sum(axis=1, dtype=np.uint64)
    o = np.argsort(h, kind="stable")
    hs = h[o]
    dup = np.flatnonzero(hs[1:] == hs[:-1])
    if len(dup) == 0:
        return {}
    cand = np.unique(np.concatenate([o[dup], o[dup + 1]]))  # rows sharing a hash, ascending
    first, inverse, count = unique_rows(np.asarray(x[cand]))
    groups = {}
    for j in np.flatnonzero(count > 1):
        members = cand[inverse == j]
        groups[int(members[0])] = members
    return groups
