"""Every pair of rows closer than a cosine-distance threshold, exactly, with a bfloat16
screen: the all-pairs product runs in bf16 (fp32 accumulation, bf16 output), which
this CPU does ~4x faster than float32, and only the pairs whose screened similarity
lies within a proven error window of the threshold are recomputed in float32.

Error of one screened value against x.y (x, y float32 rows; x~, y~ their bf16 roundings;
c~ the offset, one bf16 number near the threshold, subtracted through an extra column so
that values near the threshold are near zero and the output rounding is small there):

    |x~.y~ - x.y| <= |x~ - x| |y~| + |x| |y~ - y|        (input rounding)
    + gamma_(d+1) (|x~| |y~| + |c~|)                      (float32 accumulation)
    and the bf16 output v of t = x~.y~ - c~ has |v - t| <= U |v| / (1 - U)

so a pair with x.y > s_min can only have v >= lo (see _firstpass._lower); pairs below
lo are dropped unread, the others are recomputed in float32 and kept when x.y > s_min,
the test FAISS's inner-product range search applies (the reference, `faiss_pairs`).
"""
from __future__ import annotations

import numpy as np

from ._firstpass import U_BF16, _lower, dot_tol
from ._rows import BF16Side, bf16_bits, bf16_mm, bf16_value, torch_threads


def screen_pairs(Q: np.ndarray, D: np.ndarray, s_min: float, block: int = 1024,
                 upper: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, s): every pair Q[i], D[j] (float32 rows) with x.y > s_min (float32 test),
    s its float32 similarity; upper: Q is D, only i < j. Exact; see the module docstring."""
    import torch

    if not len(Q) or not len(D):
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0, np.float32)
    d = Q.shape[1]
    cf = float(bf16_value(bf16_bits(np.array([s_min], np.float32)))[0])  # c~, exactly
    qs, ds = BF16Side(Q, -cf), BF16Side(D, 1.0)  # q~.(d~, 1) ... with the offset column: x~.y~ - c~
    dy_max, nyb_max = float(ds.dx.max(initial=0)), float(ds.nxb.max(initial=0))
    tol = dot_tol(d + 1)
    U = U_BF16 / (1 - U_BF16)
    s32 = np.float32(s_min)
    out_i, out_j, out_s = [], [], []
    for s in range(0, len(Q), block):
        r = slice(s, s + block)
        E = qs.dx[r] * nyb_max + qs.nx[r] * dy_max + tol * (qs.nxb[r] * nyb_max + abs(cf)) + 1e-6
        lo = _lower(float(s_min) - cf - E, U)  # [b]
        # compared in bf16 (a float32 comparison would cast the whole block): lowered by
        # more than the bf16 rounding of lo can raise it, so the test stays conservative
        lo_b = torch.from_numpy((lo - np.abs(lo) * 2.0 ** -7 - 1e-7).astype(np.float32)).to(torch.bfloat16)
        c0 = s if upper else 0  # a diagonal block needs the columns from its first row on
        with torch_threads(None):
            v = bf16_mm(qs.bits[r], ds.bits[c0:])  # [b, m - c0] bf16: x~.y~ - c~, rounded
            hit = v >= lo_b[:, None]
            if upper:  # only j > i: the rest of the diagonal block is the mirror image
                hit = hit.triu_(1)
            ii, jj = (t.numpy() for t in torch.nonzero(hit, as_tuple=True))
        ii, jj = ii + s, jj + c0
        if not len(ii):
            continue
        S = np.empty(len(ii), np.float32)
        for a in range(0, len(ii), 1 << 16):
            S[a:a + (1 << 16)] = np.einsum("ij,ij->i", Q[ii[a:a + (1 << 16)]], D[jj[a:a + (1 << 16)]])
        keep = S > s32
        out_i.append(ii[keep]), out_j.append(jj[keep]), out_s.append(S[keep])
    if not out_i:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0, np.float32)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def faiss_pairs(Q: np.ndarray, D: np.ndarray, s_min: float, block: int = 1024,
                upper: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference: FAISS flat inner-product range searches (float32 BLAS)."""
    import faiss

    index = faiss.IndexFlatIP(Q.shape[1])
    index.add(D)
    out_i, out_j, out_s = [], [], []
    for s in range(0, len(Q), block):
        lims, S, I = index.range_search(Q[s:s + block], float(s_min))
        i = s + np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = i < I if upper else np.ones(len(I), bool)
        out_i.append(i[keep]), out_j.append(I[keep].astype(np.int64)), out_s.append(S[keep])
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


PAIR_METHODS = {"screen": screen_pairs, "faiss": faiss_pairs}
