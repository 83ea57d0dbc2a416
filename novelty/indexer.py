"""build-index: scan sources into the catalog, embed what is pending shard by shard,
then refresh the FAISS index. The shard is the unit of work: `embed_shards` runs in
process here, and a distributed runner can hand disjoint id ranges to workers that
call `Store.commit_shard` themselves."""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import sources, vectors
from ._compat import bounded_heap
from ._content import LINKED, ContentChanges
from .config import BuildCfg
from .encoder import Encoder, create_encoder, library_versions
from .errors import reason_kind
from .reader import make_loader
from .store import CATALOG, VECTOR_LOST, Store, create_store

log = logging.getLogger(__name__)

Progress = Callable[[int], None]  # called with the number of images just finished


@dataclass
class BuildSummary:
    scanned: int = 0
    new: int = 0
    changed: int = 0
    retried: int = 0  # failed before, unchanged since, tried again (--retry-failed)
    moved: int = 0
    kept_labeled: int = 0  # marked labeled by mark-labeled, scanned under --unlabeled again: they stay labeled
    gone: int = 0  # unlabeled images deleted from their folder: recorded as failed, out of the pool
    gone_elsewhere: int = 0  # of those, images in a folder or list not given this time (Store.sync_sources)
    labeled_missing: int = 0  # labeled images whose file is not in its scanned folder now: centers still
    linked: int = 0  # paths first met this run that reach a file indexed under another path (not failures)
    unlabeled_as_labeled: list = field(default_factory=list)  # of those, paths given under --unlabeled of labeled files
    lost_shards: list = field(default_factory=list)  # shards found missing or damaged, taken out of the catalog
    requeued: int = 0  # their images, pending again and embedded again by this run (their imported vectors: failed)
    resumed: int = 0
    unchanged: int = 0
    embedded: int = 0
    failed: int = 0
    failed_by_reason: dict = field(default_factory=dict)
    duplicate_groups: int = 0
    duplicate_images: int = 0
    content: ContentChanges = field(default_factory=ContentChanges)  # images whose bytes changed or moved (_content)
    shards: int = 0
    seconds: float = 0.0  # the whole run
    embed_seconds: float = 0.0  # reading + encoding + committing shards

    @property
    def rate(self) -> float:
        return (self.embedded + self.failed) / self.embed_seconds if self.embed_seconds > 0 else 0.0


def embed_shards(
    store: Store,
    encoder: Encoder,
    ids: np.ndarray,
    cfg: BuildCfg,
    content: ContentChanges,
    progress: Progress | None = None,
) -> tuple[int, Counter, int]:
    """Embed `ids` and commit them shard by shard; `content` gathers what their bytes say
    about earlier rows (changed and moved images). -> (embedded, failures by kind, shards).

    Shards close on batch boundaries, at cfg.shard_size images or cfg.shard_seconds,
    so a resumed run sees the same batches as an uninterrupted one."""
    loader = make_loader(str(store.root / CATALOG), ids, encoder.preprocess, encoder.image_size, cfg.reader, encoder.device)
    buf_ids: list[int] = []
    buf_vecs: list[np.ndarray] = []
    buf_hash: list[str] = []
    buf_fail: list[tuple[int, str, str | None]] = []
    embedded, shards, failed = 0, 0, Counter()
    opened = time.monotonic()

    def flush():
        nonlocal embedded, shards, opened
        if buf_ids or buf_fail:
            vecs = np.concatenate(buf_vecs) if buf_vecs else np.empty((0, encoder.dim), np.float32)
            name, changes = store.commit_shard(buf_ids, vecs, buf_hash, buf_fail)
            content.add(changes)
            if name:
                shards += 1
            embedded += len(buf_ids)
            failed.update(reason_kind(r) for _, r, _ in buf_fail)
        buf_ids.clear(), buf_vecs.clear(), buf_hash.clear(), buf_fail.clear()
        opened = time.monotonic()

    for batch_ids, batch, hashes, failures in loader:
        if batch is not None:
            buf_vecs.append(encoder.encode_images(batch))
            buf_ids.extend(batch_ids)
            buf_hash.extend(hashes)
        buf_fail.extend(failures)
        if progress:
            progress(len(batch_ids) + len(failures))
        if len(buf_ids) + len(buf_fail) >= cfg.shard_size or time.monotonic() - opened >= cfg.shard_seconds:
            flush()
    flush()
    return embedded, failed, shards


def build_index(
    root: Path,
    labeled: Sequence[Path],
    unlabeled: Sequence[Path],
    cfg: BuildCfg,
    progress_factory: Callable[[int], Progress] | None = None,
) -> BuildSummary:
    """Scan, embed what is new or changed, refresh the FAISS index. Safe to re-run."""
    with bounded_heap():
        return _build_index(root, labeled, unlabeled, cfg, progress_factory)


def _build_index(root, labeled, unlabeled, cfg: BuildCfg, progress_factory) -> BuildSummary:
    t0 = time.monotonic()
    try:
        sources.check_sources(labeled, unlabeled)
        encoder = create_encoder(cfg.encoder)  # fails fast on a bad model or weights, before any write
    except KeyboardInterrupt as e:  # stopped before the index was opened: the CLI says so, not "shards are kept"
        e.kept = "nothing was written"
        raise
    with create_store(root) as store:
        store.check_encoder(encoder.info, encoder.dim)
        store.update_manifest(versions=library_versions())
        run = store.start_run("build", {"labeled": [str(p) for p in labeled], "unlabeled": [str(p) for p in unlabeled],
                                        "cfg": asdict(cfg)})
        with store.recording_stop(run):
            s = _scan_and_embed(store, encoder, labeled, unlabeled, cfg, progress_factory)
        s.seconds = time.monotonic() - t0
        store.finish_run(run, asdict(s))
    return s


def _scan_and_embed(store, encoder, labeled, unlabeled, cfg: BuildCfg, progress_factory) -> BuildSummary:
    """Scan the sources into the catalog, embed what is pending, refresh the vectors."""
    lost = store.repair_shards(reembed=True)
    folders = [os.path.abspath(p) for p in unlabeled if Path(p).is_dir()]  # where a missing image was deleted
    unlisted: list[str] = []  # folders the scan could not list: what they hold is unknown, not gone
    counts = store.sync_sources(sources.scan(labeled, unlabeled, cfg.part, unlisted), retry_failed=cfg.retry_failed,
                                folders=folders, keep=lambda p: sources.was_listed(p, cfg.part, unlisted),
                                labeled_folders=[os.path.abspath(p) for p in labeled if Path(p).is_dir()])
    pending = store.pending_ids()
    s = BuildSummary(scanned=counts["scanned"], new=counts["new"], changed=counts["changed"], retried=counts["retried"],
                     moved=counts["moved"],
                     kept_labeled=counts["kept_labeled"], gone=counts["gone"],
                     gone_elsewhere=counts["gone_elsewhere"], lost_shards=list(lost.names),
                     requeued=lost.requeued)
    s.unlabeled_as_labeled = counts["unlabeled_as_labeled"]
    s.content.add(counts["content"])  # marks of an image reached through a link, kept at the path indexed
    s.resumed = max(0, len(pending) - s.new - s.changed - s.retried - s.requeued)  # left pending by an interrupted run
    s.unchanged = max(0, s.scanned - s.new - s.changed - s.retried - s.resumed - s.requeued)
    log.info("%d images scanned: %d new, %d changed, %d to embed", s.scanned, s.new, s.changed, len(pending))
    progress = progress_factory(len(pending)) if progress_factory and len(pending) else None
    t1 = time.monotonic()
    s.embedded, failed, s.shards = embed_shards(store, encoder, pending, cfg, s.content, progress)
    s.embed_seconds = time.monotonic() - t1
    if s.content.moved and s.gone:  # those found at a new path were moved, not deleted
        s.gone = store.still_gone(counts["gone_ids"])
        s.gone_elsewhere = min(s.gone_elsewhere, s.gone)
    s.labeled_missing = store.still_embedded(counts["labeled_missing_ids"])  # those found moved are not missing
    at_scan = Counter(reason_kind(r) for r in counts["failed_at_scan"])  # missing, unreadable; and links, said apart
    s.linked = at_scan.pop(reason_kind(LINKED), 0)
    failed.update(at_scan)
    if lost.lost:
        failed[reason_kind(VECTOR_LOST)] += lost.lost
    s.failed_by_reason = dict(failed.most_common())
    s.failed = sum(failed.values())
    s.duplicate_groups, s.duplicate_images = store.duplicate_hashes()
    if store.vectors_version and not vectors.is_current(store):
        vectors.build(store)
    return s
