"""Near-duplicate pairs at scale: the bf16 screen against FAISS range searches.

    python benchmarks/duplicates_scale.py                 # 50,000 x 512, threshold 0.05
    python benchmarks/duplicates_scale.py --n 200000

Both run `novelty.inspect.close_pairs`' kernels (novelty/_closepairs.py) on the same
vectors (select_scale.py's CLIP-like clustered data, float16 rows as the store keeps
them), chunk by chunk as `novelty duplicates` does, and must find the same pairs up to
float noise at the threshold. All pairs is quadratic: the last column extrapolates the
measured rate to 1,000,000 images.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from select_scale import data  # noqa: E402


def all_pairs(X: np.ndarray, s_min: float, chunk: int, method: str) -> tuple[set, float]:
    from novelty._closepairs import PAIR_METHODS

    f = PAIR_METHODS[method]
    t = time.perf_counter()
    got = set()
    for a in range(0, len(X), chunk):
        Q = X[a:a + chunk]
        for b in range(a, len(X), chunk):
            i, j, _ = f(Q, X[b:b + chunk], s_min, 1024, upper=b == a)
            got.update(zip((a + i).tolist(), (b + j).tolist()))
    return got, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--threshold", type=float, default=0.05, help="cosine distance (novelty duplicates' default)")
    p.add_argument("--chunk", type=int, default=65536)
    p.add_argument("--methods", nargs="+", default=["screen", "faiss"])
    a = p.parse_args()
    pool_f, _ = data("clustered", a.n, 2000)
    X16 = np.load(pool_f)
    X = X16.astype(np.float32)  # what _gather hands the kernels
    import torch  # noqa: F401  (imported before timing, as the CLI would have)

    rows, ref = [], None
    for m in a.methods:
        got, sec = all_pairs(X, 1.0 - a.threshold, a.chunk, m)
        rate = a.n * (a.n - 1) / 2 / sec
        rows.append((m, sec, len(got), rate, 1e6 * (1e6 - 1) / 2 / rate))
        ref = got if ref is None else ref
        if got != ref:
            diff = got ^ ref
            worst = max(abs(float(X[i] @ X[j]) - (1.0 - a.threshold)) for i, j in diff)
            print(f"{m}: {len(diff)} pair(s) differ from {a.methods[0]}, all within {worst:.1e} of the threshold")
    print(f"{a.n:,} x {X.shape[1]} float16 rows (clustered), threshold {a.threshold}, chunk {a.chunk:,}, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print("| method | seconds | close pairs found | pairs compared per s | 1M images, extrapolated |\n|---|---|---|---|---|")
    for m, sec, n_pairs, rate, big in rows:
        print(f"| {m} | {sec:.1f} | {n_pairs:,} | {rate:.3g} | {big / 60:.0f} min |")


if __name__ == "__main__":
    main()
