"""The FAISS index over an index directory's vectors: built block-wise from the
shards, kept in step with the catalog, searched in blocks, on a GPU when present.

The index is an IndexIDMap2 over an IndexScalarQuantizer(QT_fp16) with inner-product
metric. The shards already hold float16, so this quantizer loses nothing: search is
exact on the stored vectors, at the shards' size. Ids are catalog ids. Cosine
distance is reported as 1 - inner product.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ._files import atomic_path
from .errors import IndexDamagedError
from .store import FAISS_FILE, Store

log = logging.getLogger(__name__)


def gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def build(store: Store):
    """Build the FAISS index from the shards, one shard at a time; write it atomically."""
    import faiss

    d = store.dim
    index = faiss.IndexIDMap2(faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT))
    version = store.vectors_version
    for ids, block in store.iter_blocks():
        index.add_with_ids(np.ascontiguousarray(block, dtype=np.float32), ids)
    with atomic_path(store.root / FAISS_FILE) as tmp:  # written whole, fsync'd, renamed: as every other file here
        faiss.write_index(index, str(tmp))
    m = store.manifest
    m["faiss"] = {"file": FAISS_FILE, "ntotal": int(index.ntotal), "vectors_version": version, "type": "IDMap2,SQfp16,IP"}
    store.write_manifest(m)
    log.info("FAISS index: %d vectors", index.ntotal)
    return index


def is_current(store: Store) -> bool:
    f = store.manifest.get("faiss")
    return bool(f) and (store.root / FAISS_FILE).exists() and f.get("vectors_version") == store.vectors_version


def load(store: Store, gpu: bool | None = None):
    """The index, rebuilt first when the catalog changed since it was written (and the
    store is writable); moved to the GPU when one is present (gpu=None) or asked for."""
    import faiss

    if not is_current(store):
        if store.writable:
            return _maybe_gpu(build(store), gpu)
        why = "is older than the catalog" if (store.root / FAISS_FILE).exists() else "is missing"
        log.warning("%s %s; searching the shards directly (the next build-index or merge, or an import-embeddings that adds vectors, rebuilds it)",
                    FAISS_FILE, why)
        return _maybe_gpu(_in_memory(store), gpu)
    try:
        index = faiss.read_index(str(store.root / FAISS_FILE))
    except RuntimeError as e:  # faiss raises RuntimeError on a truncated or foreign file
        raise IndexDamagedError(f"{store.root / FAISS_FILE} is damaged ({str(e).strip().splitlines()[-1]}); delete it: "
                                "the shards hold every vector: reading commands search them meanwhile, and the next build-index, "
                                "merge, or an import-embeddings that adds vectors, rebuilds it from them") from None
    return _maybe_gpu(index, gpu)


def _in_memory(store: Store):
    import faiss

    index = faiss.IndexIDMap2(faiss.IndexScalarQuantizer(store.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT))
    for ids, block in store.iter_blocks():
        index.add_with_ids(np.ascontiguousarray(block, dtype=np.float32), ids)
    return index


def _maybe_gpu(index, gpu: bool | None):
    if gpu is False or (gpu is None and not gpu_available()):
        return index
    import faiss

    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError) as e:  # an index type without a GPU twin
        log.warning("keeping the FAISS index on the CPU: %s", e)
        return index


def search(index, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None, block: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """k nearest by cosine distance, block-wise. -> (D [nq, k] cosine distances, I [nq, k] ids; -1 past the end).

    allowed_ids restricts the search to those catalog ids (an IDSelector)."""
    import faiss

    params = None
    if allowed_ids is not None:
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64)))
    D = np.empty((len(queries), k), np.float32)
    I = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), block):
        q = np.ascontiguousarray(queries[s:s + block], dtype=np.float32)
        Ds, Is = index.search(q, k, params=params) if params is not None else index.search(q, k)
        D[s:s + block], I[s:s + block] = 1.0 - Ds, Is
    D[I < 0] = np.inf
    return D, I


def index_path(root: Path) -> Path:
    return Path(root) / FAISS_FILE
