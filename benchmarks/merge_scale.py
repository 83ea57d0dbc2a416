"""Merging the indexes of several machines: how long `novelty merge` takes at scale.

    python benchmarks/merge_scale.py                    # 4 parts x 250,000 x 512 = 1,000,000 images
    python benchmarks/merge_scale.py --parts 8 --n 50000 --dim 512

Each part is an index of unit float16 vectors brought in through import-embeddings'
library call (what build-index --part would leave, without the encoder's cost), under
the work dir. Then `merge_indexes` joins them into a fresh index, timed as a whole:
reading each part's catalog, copying its shards, one transaction per part, and
building the FAISS index over everything. The FAISS build is then timed again alone on
the merged index, so the table can split the two. A second merge of the same parts
(nothing left to add) shows what a resumed or repeated merge costs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_part(root: Path, k: int, n: int, dim: int) -> None:
    from novelty.importer import import_embeddings

    rng = np.random.default_rng(k)
    X = rng.standard_normal((n, dim), dtype=np.float32)
    vec, ids = root.parent / f"part{k}.npy", root.parent / f"part{k}.txt"
    np.save(vec, X)
    ids.write_text("".join(f"p{k}_{i}\n" for i in range(n)))
    import_embeddings(root, vec, ids, "unlabeled" if k else "labeled", model="bench")
    vec.unlink(), ids.unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", type=int, default=4)
    p.add_argument("--n", type=int, default=250_000, help="images per part")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "_work" / "merge")
    a = p.parse_args()
    if a.parts < 1 or a.n < 1 or a.dim < 1:
        raise SystemExit("--parts, --n and --dim must be at least 1")
    from novelty import vectors
    from novelty.merge import merge_indexes
    from novelty.store import create_store

    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    t = time.perf_counter()
    parts = [a.work / f"part{k}" / "index" for k in range(a.parts)]  # part 0 holds the labeled images
    for k, root in enumerate(parts):
        root.parent.mkdir()
        make_part(root, k, a.n, a.dim)
    prepare = time.perf_counter() - t
    out = a.work / "merged"
    t = time.perf_counter()
    s = merge_indexes(out, parts)
    merge = time.perf_counter() - t
    with create_store(out) as st:
        t = time.perf_counter()
        vectors.build(st)
        faiss_build = time.perf_counter() - t
    t = time.perf_counter()
    again = merge_indexes(out, parts)
    repeat = time.perf_counter() - t
    total = a.parts * a.n
    assert s.labeled + s.unlabeled == total and sum(p.added for p in again.parts) == 0
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"Machine: {os.uname().machine}, {os.cpu_count()} cores; parts prepared in {prepare:.0f} s\n")
    print("| parts | images | dim | merge, all in | of which FAISS build | rows/s | merged index on disk | merge again (nothing to add) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {a.parts} | {total:,} | {a.dim} | {merge:.1f} s | {faiss_build:.1f} s | {total / merge:,.0f} | "
          f"{size / 2**30:.2f} GiB | {repeat:.1f} s |")
    shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
