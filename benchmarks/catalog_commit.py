"""The catalog's share of build-index at scale, without the encoder: what committing
shards costs, and what following bytes (novelty._content) adds to it.

    python benchmarks/catalog_commit.py                 # 1,000,000 images, shards of 4,096
    python benchmarks/catalog_commit.py --n 200000

A first build: N paths scanned in (sync_sources), then committed shard by shard with
their content hashes (each looked up among the rows before it).
Then a second build after 1% of the files were renamed (new paths, same bytes, the old
files gone) and 1% overwritten (same paths, new bytes): the scan, and the commits of
those 2%, where the moves and the dropped scores are worked out. Vectors are random
8-d rows: the encoder is what build-index spends its time on, and it is measured by
embed_throughput.py.
Last, a build given only a new batch, while the N images already indexed sit in real
(empty) files in folders not given this time, 0.1% of them deleted: the scan lists
those folders to find the deleted ones (Store.sync_sources, gone_from).
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


def commit_all(st, ids: np.ndarray, hashes: dict[int, str], shard: int) -> None:
    X = np.random.default_rng(0).standard_normal((shard, 8)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    for s in range(0, len(ids), shard):
        chunk = ids[s:s + shard]
        st.commit_shard(chunk, X[:len(chunk)], [hashes[int(i)] for i in chunk])


def new_batch_only(work: Path, n: int) -> tuple[int, float]:
    """A build given only a new folder, while the catalog's other n images sit in folders
    not given this time: sync_sources lists those folders to find the files deleted from
    them. The files are real (empty) here, 1,000 a folder. -> (found gone, seconds)."""
    from novelty.store import ImageRecord, create_store

    pool = work / "pool"
    paths = []
    for d in range((n + 999) // 1000):
        folder = pool / f"d{d:04d}"
        folder.mkdir(parents=True)
        for i in range(min(1000, n - 1000 * d)):
            paths.append(str(folder / f"img_{i:04d}.jpg"))
            open(paths[-1], "wb").close()
    with create_store(work / "idx-batches") as st:
        st.write_manifest({"dim": 8, "encoder": {"kind": "bench"}})
        st.sync_sources(ImageRecord(p, "unlabeled", 0, 1.0, file=f"64768:{k}") for k, p in enumerate(paths))
        ids = st.pending_ids()
        X = np.zeros((len(ids), 8), np.float32)
        X[:, 0] = 1
        for s in range(0, len(ids), 65536):
            st.commit_shard(ids[s:s + 65536], X[s:s + 65536])
        for p in paths[::1000]:
            os.unlink(p)
        new = work / "new-batch"
        new.mkdir()
        t0 = time.perf_counter()
        counts = st.sync_sources((ImageRecord(str(new / f"img_{i:04d}.jpg"), "unlabeled", 0, 1.0, file=f"64769:{i}") for i in range(1000)),
                                 folders=[str(new)])
        return counts["gone_elsewhere"], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--shard", type=int, default=4096)
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "_work" / "catalog_commit")
    a = ap.parse_args()
    from novelty.store import ImageRecord, create_store

    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = a.n
    content = rng.integers(0, 2**62, n)  # the bytes of image i, as a number, all different: the paths here are
    # not files, so a byte copy would look moved (a real copy's file exists); each hash is looked up all the same
    paths = [f"/data/pool/img_{i:07d}.jpg" for i in range(n)]
    rows = []
    with create_store(a.work / "idx") as st:
        st.write_manifest({"dim": 8, "encoder": {"kind": "bench"}})
        t0 = time.perf_counter()
        st.sync_sources(ImageRecord(p, "unlabeled", 1000, 1.0, file=f"64768:{k}") for k, p in enumerate(paths))
        t1 = time.perf_counter()
        ids = st.pending_ids()
        id_of = dict(zip(paths, ids.tolist()))
        commit_all(st, ids, {id_of[p]: f"{c:016x}" for p, c in zip(paths, content)}, a.shard)
        t2 = time.perf_counter()
        rows.append(("first build", n, t1 - t0, t2 - t1))

        # 1% renamed (same bytes at a new path, the old file gone: the old folder is no
        # longer scanned, so each old row is stat'ed), 1% overwritten with new bytes
        pick = rng.permutation(n)
        moved, changed = pick[:n // 100], pick[n // 100:n // 50]
        changed_set = set(changed.tolist())
        new_paths = list(paths)
        for i in moved:
            new_paths[i] = paths[i].replace("/pool/", "/pool2/")
        t0 = time.perf_counter()
        st.sync_sources(ImageRecord(p, "unlabeled", 1001 if k in changed_set else 1000, 1.0, file=f"64768:{k}")
                        for k, p in enumerate(new_paths))
        t1 = time.perf_counter()
        ids = st.pending_ids()
        by_path = {p: i for i, p in st.db.execute("SELECT id, path FROM images WHERE status='pending'")}
        hashes = {}
        for k in moved:
            hashes[by_path[new_paths[k]]] = f"{content[k]:016x}"
        for k in changed:
            hashes[by_path[new_paths[k]]] = f"{content[k] ^ 1:016x}"
        commit_all(st, ids, hashes, a.shard)
        t2 = time.perf_counter()
        rows.append(("rebuild: 1% moved, 1% new bytes", len(ids), t1 - t0, t2 - t1))
        moved_rows = st.db.execute("SELECT COUNT(*) FROM images WHERE reason LIKE 'moved:%'").fetchone()[0]
    gone_elsewhere, elsewhere_scan = new_batch_only(a.work, n)
    print(f"Catalog side of build-index, {n:,} images, shards of {a.shard:,}, "
          f"{os.cpu_count()} cores (benchmarks/catalog_commit.py)\n")
    print("| build | images committed | scan into catalog | commit shards | per committed image |")
    print("|---|---|---|---|---|")
    for name, k, scan, commit in rows:
        print(f"| {name} | {k:,} | {scan:.1f} s | {commit:.1f} s | {1e6 * commit / max(k, 1):.1f} µs |")
    print(f"\nold rows found moved: {moved_rows:,}")
    print(f"\nA build given only a new batch of 1,000 images, in a catalog of {n:,} real (empty) files in folders "
          f"of 1,000, 0.1% of them deleted since: scan into catalog {elsewhere_scan:.1f} s, "
          f"{gone_elsewhere:,} found gone by listing their {n // 1000:,} folders")
    shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
