"""Frozen configuration dataclasses. CLI options map onto their fields one to one."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_INDEX = Path("index")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # a GIF: its first frame


@dataclass(frozen=True)
class EncoderCfg:
    model: str = DEFAULT_MODEL
    # "auto" picks a LAION tag for the model; "none" gives random weights (tests);
    # any other value is an open_clip pretrained tag or a local weights file.
    pretrained: str = "auto"
    device: str = "auto"  # auto | cpu | cuda


@dataclass(frozen=True)
class ReaderCfg:
    batch_size: int = 32
    workers: int = -1  # -1: choose from the device and core count
    max_pixels: int = 89_478_485  # PIL's own decompression-bomb limit
    draft: bool = True  # PIL JPEG draft mode: decode at the smallest scale >= the input size


@dataclass(frozen=True)
class BuildCfg:
    encoder: EncoderCfg = EncoderCfg()
    reader: ReaderCfg = ReaderCfg()
    shard_size: int = 4096  # images per shard: the unit of work and of loss on a crash
    shard_seconds: float = 120.0  # also close a shard after this long, so slow CPUs lose little
    retry_failed: bool = False
    part: tuple[int, int] | None = None  # (K, N): only the images in part K of N (sources.in_part); merge joins the parts
