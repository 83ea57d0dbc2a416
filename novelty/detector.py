"""`novelty uncertainty`: run the team's own detector or segmenter over the index's
unlabeled images with MC dropout and store one score per image in the catalog.

Scores are committed every `commit_every` images into a run that stays open until the
end; a killed run is resumed by the same command (same spec, kind, passes, seed,
aggregation), which scores only the images the open run lacks. `select` reads the
latest finished run.

An image whose model input would exceed `max_pixels` is recorded as failed ("too
large"), like an unreadable one, so the run goes on and a resumed run does not meet it
again: the T passes hold T copies of its activations (one 64 MP image took a tiny
segmenter past 24 GB). Where the input is the decoded image itself (the default
preprocess without `image_size`) the file's header is checked before decoding; where
the preprocess may resize, decoding is bounded by PIL's bomb limit and the tensor it
makes is checked."""
from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .config import ReaderCfg
from .errors import ConfigError, ModelError, reason_kind
from .reader import CatalogImages, die_with_parent
from .store import CATALOG, open_store

log = logging.getLogger(__name__)

# the default --max-pixels: 4K frames (8.3 MP), 12 MP phone photos and 16 MP sensors
# (4608x3456) pass; a 4000x3000 image already takes a tiny segmenter to 6 GB at T = 10
MAX_PIXELS = 4096 * 4096
BOMB_PIXELS = ReaderCfg().max_pixels  # PIL's decompression-bomb limit: the most ever decoded, unless max_pixels is higher


@dataclass(frozen=True)
class DetectorCfg:
    spec: str
    kind: str = "detection"
    passes: int = 10
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    aggregation: str = "max"
    topk: int = 3
    score_thresh: float = 0.5  # detection: a box exists in a pass at this score (the operating point)
    top_percent: float = 5.0  # segmentation: mean of the top-k % most uncertain pixels
    inject_dropout: float = 0.0
    image_size: int | None = None  # resize for the default preprocess; None keeps each image's size
    workers: int = 1
    split: str = "unlabeled"
    commit_every: int = 1024
    share_trunk: bool = True  # dropout-free modules once per image (uncertainty/trunk.py); scores equal up to rounding
    precision: str = "fp32"  # fp32 | bf16 | fp16: the passes under torch.autocast (uncertainty/runner.py)
    max_pixels: int = MAX_PIXELS  # the largest model input (H*W) scored; a larger image is recorded as failed


MAX_PASSES = 10_000


@dataclass
class UncertaintySummary:
    run: int
    scored: int = 0
    failed: int = 0
    resumed: int = 0
    skipped_no_image: int = 0
    failed_by_reason: dict = field(default_factory=dict)
    failed_example: dict = field(default_factory=dict)  # kind -> the first whole reason of that kind
    mean: float = 0.0
    with_score: int = 0  # images of the run (this call and before an interruption) that have a score
    without_score: int = 0  # and those that failed
    seconds: float = 0.0


def collate_any(items):
    """Stack same-size images; keep a list when sizes differ (detectors take lists)."""
    import torch

    ok = [it for it in items if it[1] is not None]
    failures = [(it[0], it[3]) for it in items if it[1] is None]
    tensors = [it[1] for it in ok]
    if tensors and len({tuple(t.shape) for t in tensors}) == 1:
        tensors = torch.stack(tensors)
    return [it[0] for it in ok], tensors, failures


def _header_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding; None when it cannot be
    read, and the decode that follows says why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.size
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return None


class CappedImages(CatalogImages):
    """CatalogImages whose tensors have at most `max_pixels` pixels; a larger image is a
    failure with its reason. `native`: the tensor is the decoded image at its own size,
    so the header is checked and a too large image is never decoded."""

    def __init__(self, catalog: str, ids: np.ndarray, preprocess: Callable, max_pixels: int, native: bool):
        super().__init__(catalog, ids, preprocess, None, max(max_pixels, BOMB_PIXELS))
        self.cap, self.native = max_pixels, native

    def __getitem__(self, i: int):
        image_id = int(self.ids[i])
        size = _header_size(self._path(image_id)) if self.native else None
        if size and size[0] * size[1] > self.cap:
            return image_id, None, None, (f"too large: {size[0]}x{size[1]} exceeds the {self.cap} pixel limit of uncertainty "
                                          "(--max-pixels); score it with --image-size S or raise the limit")
        image_id, tensor, digest, reason = super().__getitem__(i)
        shape = getattr(tensor, "shape", ())  # [3, H, W]; anything else is the runner's to refuse
        if len(shape) >= 2 and int(shape[-1]) * int(shape[-2]) > self.cap:
            return image_id, None, digest, (f"too large: the preprocess made a {shape[-1]}x{shape[-2]} input, over the "
                                            f"{self.cap} pixel limit of uncertainty (--max-pixels); resize it there or raise the limit")
        return image_id, tensor, digest, reason


def _params(cfg: DetectorCfg) -> dict:
    p = asdict(cfg)
    for k in ("batch_size", "workers", "commit_every", "device", "share_trunk"):
        p.pop(k)  # how, not what: they do not change the scores
    if p["precision"] == "fp32":
        p.pop("precision")  # as before the option existed: a run started then still resumes
    if p["max_pixels"] == MAX_PIXELS:
        p.pop("max_pixels")  # likewise
    return p


def _open_run(store, params: dict) -> tuple[int, set[int]]:
    """The unfinished run with these params (resume), else a new one."""
    text = json.dumps(params, sort_keys=True)
    row = store.db.execute("SELECT id FROM runs WHERE kind='uncertainty' AND finished IS NULL AND params=? "
                           "ORDER BY id DESC LIMIT 1", (text,)).fetchone()
    if row:
        store.claim_run(row[0])
        done = {i for (i,) in store.db.execute("SELECT image FROM uncertainty WHERE run=?", (row[0],))}
        return row[0], done
    return store.start_run("uncertainty", params), set()


def score_index(root: Path, cfg: DetectorCfg, progress_factory: Callable[[int], Callable[[int], None]] | None = None) -> UncertaintySummary:
    import torch

    from .uncertainty import (DetectionCfg, SegmentationCfg, UncertaintyCfg, default_preprocess, find_dropout, load_model_spec,
                              score_batches)

    if cfg.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.image_size is not None and cfg.image_size < 1:
        raise ConfigError(f"--image-size must be >= 1, got {cfg.image_size}")
    if cfg.max_pixels < 1:
        raise ConfigError(f"--max-pixels must be >= 1, got {cfg.max_pixels}")
    if cfg.image_size is not None and cfg.image_size ** 2 > cfg.max_pixels:
        raise ConfigError(f"--image-size {cfg.image_size} makes inputs of {cfg.image_size ** 2} pixels, "
                          f"over --max-pixels {cfg.max_pixels}; use a smaller size or raise the limit")
    if cfg.passes > MAX_PASSES:
        raise ConfigError(f"--passes must be at most {MAX_PASSES:,} (MC dropout settles within tens), got {cfg.passes}")
    ucfg = UncertaintyCfg(kind=cfg.kind, passes=cfg.passes, seed=cfg.seed, device=cfg.device, inject_dropout=cfg.inject_dropout,
                          share_trunk=cfg.share_trunk, precision=cfg.precision,
                          detection=DetectionCfg(aggregation=cfg.aggregation, topk=cfg.topk, score_thresh=cfg.score_thresh),
                          segmentation=SegmentationCfg(top_percent=cfg.top_percent))
    from .uncertainty.runner import autocast_dtype, resolve_device

    autocast_dtype(ucfg.precision, resolve_device(ucfg.device))  # fp16 on a CPU fails here, before a run is started
    t0 = time.monotonic()
    with open_store(root, writable=True) as store:
        rows = store.db.execute("SELECT id, path FROM images WHERE split=? AND status='embedded' ORDER BY id", (cfg.split,)).fetchall()
        if not rows:
            raise ConfigError(f"index {root} has no embedded {cfg.split} images to score")
        with_image = np.asarray([i for i, p in rows if p is not None], dtype=np.int64)
        if not len(with_image):
            raise ConfigError(f"none of the {len(rows)} {cfg.split} vectors in {root} has an image file to run the detector on; "
                              "import them with `import-embeddings --paths`, or score them elsewhere and use import-uncertainty")
        model, preprocess = load_model_spec(cfg.spec, cfg.image_size)
        if cfg.inject_dropout == 0 and not find_dropout(model):
            raise ModelError(f"{cfg.spec} has no dropout layer, so MC dropout has nothing to sample; "
                             "add dropout before its head layers with --inject-dropout P")
        run, done = _open_run(store, _params(cfg))
        todo = np.asarray([i for i in with_image if int(i) not in done], dtype=np.int64)
        s = UncertaintySummary(run=run, resumed=len(done), skipped_no_image=len(rows) - len(with_image))
        if s.skipped_no_image:
            log.warning("%d imported vectors have no image file to run the detector on", s.skipped_no_image)
        with store.recording_stop(run):
            native = isinstance(preprocess, default_preprocess) and preprocess.size is None
            ds = CappedImages(str(store.root / CATALOG), todo, preprocess, cfg.max_pixels, native)
            loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=collate_any,
                                                 worker_init_fn=die_with_parent)
            decode_failures: list[tuple[int, str]] = []

            def batches():
                for ids, images, failures in loader:
                    decode_failures.extend(failures)
                    if ids:
                        yield ids, images

            progress = progress_factory(len(todo)) if progress_factory and len(todo) else None
            pending: list = []

            def commit():
                with store.transaction() as db:
                    db.executemany("INSERT OR REPLACE INTO uncertainty(run, image, value, reason) VALUES (?,?,?,?)",
                                   [(run, int(r.key), r.score, r.error) for r in pending]
                                   + [(run, int(i), None, reason) for i, reason in decode_failures])
                for reason in [r.error for r in pending if r.score is None] + [reason for _, reason in decode_failures]:
                    kind = reason_kind(reason)
                    s.failed_by_reason[kind] = s.failed_by_reason.get(kind, 0) + 1
                    s.failed_example.setdefault(kind, reason)
                s.scored += sum(r.score is not None for r in pending)
                s.failed += sum(r.score is None for r in pending) + len(decode_failures)
                pending.clear(), decode_failures.clear()

            for r in score_batches(model, batches(), ucfg, progress=lambda n: progress and progress(n)):
                pending.append(r)
                if len(pending) >= cfg.commit_every:
                    commit()
            commit()
        n, total, mean = store.db.execute("SELECT COUNT(value), COUNT(*), AVG(value) FROM uncertainty WHERE run=?",
                                          (run,)).fetchone()
        s.with_score, s.without_score, s.mean = int(n), int(total) - int(n), float(mean or 0.0)
        s.seconds = time.monotonic() - t0
        store.finish_run(run, asdict(s))
    return s
