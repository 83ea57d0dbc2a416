"""Decode images for the encoder: read bytes once (hash them), decode in JPEG draft
mode, apply EXIF orientation, convert every mode to RGB, preprocess. Failures are
returned with a reason, never raised, so one bad file never stops a run."""
from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .config import ReaderCfg

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a failure, not a grey half


@dataclass
class Decoded:
    image: Image.Image | None  # RGB
    hash: str | None
    reason: str | None = None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB. Transparency is composited over white;
    16-bit and float greyscale are rescaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def decode(data: bytes, draft_size: int | None, max_pixels: int) -> Decoded:
    """Bytes to an oriented RGB image, or a reason why not."""
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    if not data:
        return Decoded(None, digest, "empty file")
    Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's own check, at open, before any decoding
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                return Decoded(None, digest, f"too large: {w}x{h} exceeds the {max_pixels} pixel limit")
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            img = ImageOps.exif_transpose(img)
            return Decoded(to_rgb(img), digest)
    except UnidentifiedImageError:
        return Decoded(None, digest, "not an image")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Decoded(None, digest, f"too large: {e}")
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        kind = "truncated" if "truncated" in msg or isinstance(e, EOFError) else "decode error"
        return Decoded(None, digest, f"{kind}: {msg}")


def read_file(path: str, draft_size: int | None, max_pixels: int) -> Decoded:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return Decoded(None, None, "not found")
    except OSError as e:
        return Decoded(None, None, f"unreadable: {type(e).__name__}: {e.strerror or e}")
    return decode(data, draft_size, max_pixels)


class CatalogImages:
    """torch Dataset over catalog ids: each worker looks paths up in its own read-only
    connection, so memory does not grow with the number of images."""

    def __init__(self, catalog: str, ids: np.ndarray, preprocess: Callable, draft_size: int | None, max_pixels: int):
        self.catalog, self.ids = catalog, ids
        self.preprocess, self.draft_size, self.max_pixels = preprocess, draft_size, max_pixels
        self._db: sqlite3.Connection | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.ids)

    def _path(self, image_id: int) -> str:
        if self._db is None or self._pid != os.getpid():
            self._db = sqlite3.connect(f"file:{self.catalog}?mode=ro", uri=True, timeout=60)
            self._pid = os.getpid()
        return self._db.execute("SELECT path FROM images WHERE id=?", (image_id,)).fetchone()[0]

    def __getitem__(self, i: int):
        image_id = int(self.ids[i])
        d = read_file(self._path(image_id), self.draft_size, self.max_pixels)
        tensor = None
        if d.image is not None:
            try:
                tensor = self.preprocess(d.image)
            except Exception as e:  # a preprocessing bug must not kill the run either
                d.reason = f"decode error: preprocess failed: {type(e).__name__}: {e}"
        return image_id, tensor, d.hash, d.reason


def collate(items):
    """Stack the good images; pass failures through. -> (ids, [b,3,H,W] or None, hashes, failures)."""
    import torch

    ok = [it for it in items if it[1] is not None]
    failures = [(it[0], it[3], it[2]) for it in items if it[1] is None]
    batch = torch.stack([it[1] for it in ok]) if ok else None
    return [it[0] for it in ok], batch, [it[2] for it in ok], failures


def default_workers(device: str) -> int:
    cores = os.cpu_count() or 1
    # On a CPU the encoder, not decoding, is the bottleneck (see benchmarks/RESULTS.md):
    # one decode worker keeps up and leaves the cores to the model.
    return min(16, cores) if device == "cuda" else 1


def die_with_parent(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: on Linux, the kernel kills this worker when the process
    that started it dies (kill -9 of a run), instead of leaving an orphan that prints a
    traceback when its pipe closes. Elsewhere a no-op. A SIGTERM sent to the whole
    process group (slurm) is left to the parent, which stops the run cleanly and then
    shuts its workers down: a worker killed first would turn that into a loader error."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the call: nobody will read what this worker makes
        os._exit(0)


def make_loader(catalog: str, ids: np.ndarray, preprocess: Callable, image_size: int, cfg: ReaderCfg, device: str):
    import torch

    ds = CatalogImages(catalog, ids, preprocess, image_size if cfg.draft else None, cfg.max_pixels)
    workers = cfg.workers if cfg.workers >= 0 else default_workers(device)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        worker_init_fn=die_with_parent,
    )
