"""Look before labeling: an image's nearest neighbours (by id, path, a new image file
or a text prompt) and groups of near-duplicates. Free functions over the store, the
FAISS index and numpy blocks; nothing here holds the whole pool at once."""
from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import vectors
from ._closepairs import PAIR_METHODS
from ._files import atomic_file
from ._rows import unit_float32
from .config import EncoderCfg, ReaderCfg
from .errors import ConfigError, EncoderError, IndexMissingError, InputError
from .store import SPLITS, Layout, Store, open_store

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.05  # cosine distance: CLIP near-copies (re-encodes, crops, resizes) fall below it
Progress = Callable[[int], None]


def check_split(split: str | None) -> str | None:
    """'all' (or None) means both splits."""
    if split in (None, "all"):
        return None
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, all; got {split!r}")
    return split


def unit32(X: np.ndarray) -> np.ndarray:
    """Rows ([n, d] or one [d]) as unit float32: the stored float16 vectors have norms of
    1 +- ~1e-3, and every distance novelty reports (select, export, report, neighbors,
    duplicates) is the cosine distance of the renormalised rows, so they agree."""
    X = np.asarray(X)
    return unit_float32(X[None])[0] if X.ndim == 1 else unit_float32(X)


def knn_blocks(
    store: Store,
    xq: np.ndarray,  # [n, d] unit rows
    k: int,
    split: str | None,
    exclude: np.ndarray | None = None,
    radius: float | None = None,
    max_elems: int = 1 << 24,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Exact k nearest among the stored vectors of `split` (less `exclude`), brute force
    over the shards block by block, never more than max_elems distances at once.
    -> (D [n, k] cosine distances, inf past the end; I [n, k] catalog ids, -1 past the
    end; count [n] of vectors within `radius` (inclusive), when a radius is given)."""
    xq = unit32(xq)
    n = len(xq)
    D = np.full((n, k), np.inf, np.float32)
    I = np.full((n, k), -1, np.int64)
    count = np.zeros(n, np.int64) if radius is not None else None
    excl = np.unique(exclude) if exclude is not None else np.empty(0, np.int64)
    for ids, X in store.iter_blocks(split):
        if len(excl):
            keep = ~np.isin(ids, excl)
            ids, X = ids[keep], X[keep]
        if not len(ids):
            continue
        xb = unit32(X)  # [b, d]
        kk = min(k, len(ids))
        step = max(1, max_elems // len(ids))
        for s in range(0, n, step):
            Db = 1.0 - xq[s:s + step] @ xb.T  # [q, b]
            if count is not None:
                count[s:s + step] += (Db <= radius).sum(axis=1)
            part = np.argpartition(Db, kk - 1, axis=1)[:, :kk]
            Dc = np.concatenate([D[s:s + step], np.take_along_axis(Db, part, axis=1)], axis=1)
            Ic = np.concatenate([I[s:s + step], ids[part]], axis=1)
            o = np.argsort(Dc, axis=1, kind="stable")[:, :k]
            D[s:s + step], I[s:s + step] = np.take_along_axis(Dc, o, axis=1), np.take_along_axis(Ic, o, axis=1)
    return D, I, count


# -------------------------------------------------------------------------- queries
@dataclass(frozen=True)
class NeighborsCfg:
    query: str | None = None  # an indexed id or path, or an image file to embed
    text: str | None = None  # a prompt for the CLIP text tower
    k: int = 10
    split: str | None = None  # None: both splits
    model: str | None = None  # the model config .json, when the index was built from one
    device: str = "auto"
    pretrained: str | None = None  # the index's weights file at a new place (its SHA-256 must match)


@dataclass
class Neighbor:
    rank: int
    image: int  # catalog id
    id: str  # display id
    path: str | None
    split: str
    distance: float  # cosine distance


@dataclass
class NeighborsResult:
    query: dict  # kind (indexed | image | text), and id/path/text
    neighbors: list[Neighbor] = field(default_factory=list)


def query_encoder(store: Store, model: str | None = None, device: str = "auto", pretrained: str | None = None):
    """Rebuild the index's own encoder from its manifest; refuse another model. The
    weights are the file or tag build-index recorded, or `pretrained`: the same file
    moved or copied (an index copied to another machine), checked by its SHA-256."""
    from .encoder import create_encoder, register_model_config

    enc = store.manifest.get("encoder")
    if not enc:
        raise IndexMissingError(f"index {store.root} holds no vectors yet")
    if enc.get("kind") == "imported":
        raise ConfigError(f"index {store.root} holds imported vectors (model {enc.get('model')!r}): only ids in the index "
                          "can be queried; text and new-image queries need an index made by build-index")
    config = enc.get("model_config")  # a model-config .json build-index was given
    name = model or (config if config and Path(config).is_file() else enc["model"])
    from ._compat import import_open_clip

    if not name.endswith(".json") and register_model_config(name) not in import_open_clip().list_models():
        raise EncoderError(f"the index was built with model {name!r}, which open_clip does not know; "
                           "if it came from a model config file, pass --model PATH.json")
    weights = pretrained or str(enc.get("pretrained", "none"))
    if pretrained is None and enc.get("weights_sha256") and not Path(weights).is_file():
        raise ConfigError(f"the index's weights file {weights} is not there any more; pass --pretrained with its new "
                          f"path (the same file: its SHA-256 is checked)")
    encoder = create_encoder(EncoderCfg(model=name, pretrained=weights, device=device))
    store.check_encoder(encoder.info, encoder.dim)  # IndexMismatchError naming both models
    return encoder


def embed_image_file(encoder, path: str) -> np.ndarray:
    """One image file -> [d] float32 unit vector, read the way build-index reads it."""
    from .reader import read_file

    d = read_file(path, encoder.image_size, ReaderCfg().max_pixels)
    if d.image is None:
        raise InputError(f"cannot embed {path}: {d.reason}")
    return encoder.encode_images(encoder.preprocess(d.image).unsqueeze(0))[0]


def query_vector(store: Store, cfg: NeighborsCfg) -> tuple[np.ndarray, int | None, dict]:
    """-> (query [d] float32, its catalog id when it is indexed, a description)."""
    if cfg.query is None and cfg.text is None:
        raise ConfigError("give QUERY (an id, a path or an image file) or --text \"a prompt\"")
    if cfg.query is not None and cfg.text is not None:
        raise ConfigError("give either QUERY (an id, a path or an image file) or --text, not both")
    if cfg.text is not None:
        if not cfg.text.strip():
            raise ConfigError("--text is empty")
        return query_encoder(store, cfg.model, cfg.device, cfg.pretrained).encode_text([cfg.text])[0], None, {"kind": "text", "text": cfg.text}
    found, _ = store.resolve([cfg.query])
    if len(found):
        found, moved = store.follow_moves(found)
        if moved:
            log.warning("%s is indexed at %s (the file moved there, or the two paths reach one file)", cfg.query,
                        store.path_of(int(found[0])))
    image = int(found[0]) if len(found) else None
    if image is not None:
        status, path = store.db.execute("SELECT status, path FROM images WHERE id=?", (image,)).fetchone()
        shown, _, split = store.describe([image])[image]
        desc = {"kind": "indexed", "id": shown, "path": path, "split": split}
        if status == "embedded":
            return unit32(store.vectors(ids=np.array([image]))[1][0]), image, desc
        if not (path and os.path.isfile(path)):
            raise InputError(f"{cfg.query!r} is in the index but has no vector ({status})")
    elif not os.path.isfile(cfg.query):
        raise InputError(f"{cfg.query!r} is neither an id or path in the index nor an image file")
    path = os.path.abspath(cfg.query) if image is None else path
    xq = embed_image_file(query_encoder(store, cfg.model, cfg.device, cfg.pretrained), path)
    return xq, image, {"kind": "image" if image is None else "indexed", "path": path}


RESCORE = 16  # candidates FAISS returns beyond k, rescored on the renormalised rows


def search_neighbors(store: Store, index, xq: np.ndarray, k: int, split: str | None, exclude: int | None = None) -> list[Neighbor]:
    """The k nearest of one query [d] in `split` (None: all): FAISS's exact search over
    the stored float16 rows for k + RESCORE candidates, whose cosine distances are then
    computed on the renormalised rows (unit32), as everywhere else, and sorted again.
    The rescoring moves a distance by at most ~1e-3, so only a near-tie at the k-th
    place could differ from a full search on the renormalised rows."""
    allowed = store.embedded(split).ids if split else None
    if allowed is not None and len(allowed) == 0:
        return []
    _, I = vectors.search(index, xq[None, :], k + RESCORE + (exclude is not None), allowed)
    cand = np.unique(I[0][(I[0] >= 0) & (I[0] != (-1 if exclude is None else exclude))])
    if not len(cand):
        return []
    ids, Y = store.vectors(ids=cand)
    dist = np.maximum(np.float32(1.0) - unit32(Y) @ unit32(xq), np.float32(0.0))
    o = np.lexsort((ids, dist))[:k]  # by distance, ties to the lower id
    keep = [(float(dist[j]), int(ids[j])) for j in o]
    meta = store.describe([i for _, i in keep])
    return [Neighbor(r, i, meta[i][0], meta[i][1], meta[i][2], dist) for r, (dist, i) in enumerate(keep, start=1)]


def find_neighbors(root: Path, cfg: NeighborsCfg) -> NeighborsResult:
    if cfg.k < 1:
        raise ConfigError(f"--k must be >= 1, got {cfg.k}")
    split = check_split(cfg.split)
    with open_store(root) as store:
        xq, image, desc = query_vector(store, cfg)
        index = vectors.load(store)
        return NeighborsResult(desc, search_neighbors(store, index, xq, cfg.k, split, exclude=image))


# ----------------------------------------------------------------------- union-find
def find_roots(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Roots of nodes x, vectorised; compresses the paths it walks."""
    r = parent[x]
    while True:
        up = parent[r]
        if np.array_equal(up, r):
            break
        r = up
    parent[x] = r
    return r


def union_pairs(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join a[i] with b[i] for every i, vectorised. A root is always hooked under a
    smaller one, so the forest never gains a cycle; each pass joins at least one pair."""
    while len(a):
        ra, rb = find_roots(parent, a), find_roots(parent, b)
        todo = ra != rb
        a, b, ra, rb = a[todo], b[todo], ra[todo], rb[todo]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))


def components(parent: np.ndarray) -> np.ndarray:
    return find_roots(parent, np.arange(len(parent)))


# ----------------------------------------------------------------------- duplicates
@dataclass(frozen=True)
class DuplicatesCfg:
    threshold: float = DEFAULT_THRESHOLD  # pairs closer than this (cosine distance) are near-duplicates
    split: str | None = None  # None: both splits
    chunk: int = 65536  # vectors per database block held in memory (two at a time)
    block: int = 1024  # queries per product: bounds the pairs held at once
    method: str = "screen"  # screen: bf16 product + exact float32 recheck | faiss: float32 range search


@dataclass
class DuplicateGroups:
    image: np.ndarray  # [g] catalog ids of images in a group, ordered by group
    group: np.ndarray  # [g] group number, 1 = the largest
    summary: dict


def check_duplicates_cfg(cfg: DuplicatesCfg) -> None:
    if not 0 < cfg.threshold <= 2:
        raise ConfigError(f"--threshold is a cosine distance in (0, 2], got {cfg.threshold}")
    if cfg.block < 1 or cfg.chunk < 1:
        raise ConfigError(f"block and chunk must be >= 1, got {cfg.block} and {cfg.chunk}")
    if cfg.method not in PAIR_METHODS:
        raise ConfigError(f"unknown pair method {cfg.method!r}; choose one of: {', '.join(PAIR_METHODS)}")
    check_split(cfg.split)


def n_chunk_pairs(n: int, chunk: int) -> int:
    k = -(-n // chunk)
    return k * (k + 1) // 2


def _gather(store: Store, lay: Layout, sel: slice) -> np.ndarray:
    """Vectors at layout positions `sel`, shard by shard: [b, d] unit float32."""
    shard, row = lay.shard[sel], lay.row[sel]
    out = np.empty((len(shard), store.dim), np.float32)
    for k in np.unique(shard):
        m = shard == k
        out[m] = store.listed_shard(lay.names[k])[row[m]]
    return unit32(out)


def close_pairs(store: Store, lay: Layout, cfg: DuplicatesCfg, progress: Progress | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Layout positions (i < j) of every pair closer than cfg.threshold. Exact: each query
    chunk against itself and every later chunk (_closepairs: a bf16 screen with a proven
    error window and a float32 recheck, or FAISS range searches), so memory is bounded by
    two chunks and one block of results."""
    pairs = PAIR_METHODS[cfg.method]
    n, C = len(lay.ids), cfg.chunk
    s_min = 1.0 - cfg.threshold
    for a in range(0, n, C):
        Q = _gather(store, lay, slice(a, a + C))  # [c, d]
        for b in range(a, n, C):
            D = Q if b == a else _gather(store, lay, slice(b, b + C))
            i, j, _ = pairs(Q, D, s_min, cfg.block, upper=b == a)
            yield a + i, b + j
            if progress:
                progress(1)


def find_duplicates(store: Store, cfg: DuplicatesCfg, progress: Progress | None = None) -> DuplicateGroups:
    """Connected components of the graph of pairs closer than cfg.threshold, merged by
    a union-find over positions as the pair lists stream in; never an all-pairs matrix."""
    check_duplicates_cfg(cfg)
    split = check_split(cfg.split)
    lay = store.embedded(split)
    ids = lay.ids  # [n] sorted by id; positions index the union-find
    parent = np.arange(len(ids), dtype=np.int64)
    pairs = 0
    for i, j in close_pairs(store, lay, cfg, progress):
        pairs += len(i)
        union_pairs(parent, i, j)
    roots = components(parent) if len(ids) else parent
    labeled = np.zeros(len(ids), bool)
    if len(ids):
        lab = store.embedded("labeled").ids
        labeled = np.isin(ids, lab) if split is None else np.full(len(ids), split == "labeled")
    size = np.bincount(roots, minlength=len(ids))
    has_labeled = np.bincount(roots, weights=labeled, minlength=len(ids)) > 0
    member = size[roots] > 1
    # number groups by size, largest first; ties by their smallest id
    group_roots = np.flatnonzero(size > 1)
    order = np.lexsort((group_roots, -size[group_roots]))
    number = np.zeros(len(ids), np.int64)
    number[group_roots[order]] = np.arange(1, len(group_roots) + 1)
    pos = np.flatnonzero(member)
    pos = pos[np.lexsort((ids[pos], ~labeled[pos], number[roots[pos]]))]
    pool = ~labeled
    n_pool = int(pool.sum())
    summary = {
        "threshold": cfg.threshold,
        "split": split or "all",
        "images": len(ids),
        "pairs": pairs,
        "groups": len(group_roots),
        "in_groups": int(member.sum()),
        "largest": int(size.max()) if len(group_roots) else 0,
        "pool": n_pool,
        "pool_in_groups": float((member & pool).sum() / n_pool) if n_pool else 0.0,
        # share of the unlabeled images in a group with a labeled image (linked by a chain of near-copies): labeling
        # them adds little
        "pool_represented": float((member & pool & has_labeled[roots]).sum() / n_pool) if n_pool and split is None else None,
    }
    return DuplicateGroups(ids[pos], number[roots[pos]], summary)


def write_groups_csv(store: Store, path: Path, groups: DuplicateGroups, chunk: int = 65536) -> None:
    """group,id,path,split rows, streamed to a temporary file and os.replace'd."""
    with atomic_file(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["group", "id", "path", "split"])
        for s in range(0, len(groups.image), chunk):
            ids, num = groups.image[s:s + chunk], groups.group[s:s + chunk]
            meta = store.describe(ids)
            w.writerows((int(g), meta[i][0], meta[i][1] or "", meta[i][2]) for i, g in zip(ids.tolist(), num))


def duplicates(root: Path, cfg: DuplicatesCfg, out: Path | None, progress_factory=None, html: Path | None = None,
               gallery=None) -> dict:
    """Find near-duplicate groups, write them to `out` (CSV) and, when `html` is given, a
    page of their thumbnails (novelty.gallery, `gallery` a GalleryCfg); return the summary."""
    from .export import check_page_out
    from .gallery import GalleryCfg, check_gallery_cfg, write_gallery

    if out is not None and Path(out).suffix.lower() != ".csv":
        raise ConfigError(f"cannot write {out}: duplicates are written as .csv")
    check_duplicates_cfg(cfg)
    gallery = gallery or GalleryCfg()
    check_gallery_cfg(gallery)
    if html is not None:
        check_page_out(html)
    with open_store(root) as store:
        n = len(store.embedded(check_split(cfg.split)).ids)
        progress = progress_factory(n_chunk_pairs(n, cfg.chunk)) if progress_factory else None
        groups = find_duplicates(store, cfg, progress=progress)
        if out is not None:
            write_groups_csv(store, out, groups)
        if html is not None:
            groups.summary["html_groups"] = write_gallery(store, html, groups, gallery, out)
    return groups.summary
