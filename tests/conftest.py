"""Shared fixtures: generated images (good, odd and broken) and tiny open_clip configs."""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from novelty.sample import SampleCfg, make_sample

# huggingface_hub reads this once, when first imported: set it before any fixture (a
# module-scoped one included) can import open_clip, or a later tag download retries the network
os.environ["HF_HUB_OFFLINE"] = "1"

HERE = Path(__file__).parent
TINY = str(HERE / "tiny-clip.json")  # 32-d, 64 px: fast on a CPU
TINY_WIDE = str(HERE / "tiny-clip-wide.json")  # the same with 48-d output
_runner = CliRunner()


def screenshot(page: Path, tmp: Path, width: int, height: int, min_bytes: int = 10_000) -> np.ndarray | None:
    """The page rendered by headless chromium, [height, width] grey levels; None when
    chromium wrote no picture of at least `min_bytes` (the callers skip when chromium is
    not on PATH)."""
    import subprocess

    png = tmp / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
         f"--screenshot={png}", f"--window-size={width},{height}", Path(page).resolve().as_uri()],
        check=False, capture_output=True, timeout=50,
    )
    if not png.exists() or png.stat().st_size < min_bytes:
        return None
    return np.asarray(Image.open(png).convert("L"))


def run(*args):
    """The novelty CLI in-process (typer's CliRunner); arguments are str()-ed."""
    from novelty.cli import app

    return _runner.invoke(app, [str(a) for a in args])


def unit(X) -> np.ndarray:
    """Rows scaled to unit length, in float64 (brute-force references)."""
    X = np.asarray(X, dtype=np.float64)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # tests never reach for the network; a tag download fails at once
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    make_sample(root, SampleCfg(n_labeled=24, n_unlabeled=72, size=96))
    return root


def copy_samples(dest: Path, sample_dir: Path, n_lab: int = 4, n_unl: int = 10) -> tuple[Path, Path]:
    """The first good sample images copied into dest/labeled and dest/unlabeled.
    -> (those two folders)."""
    for split, n in (("labeled", n_lab), ("unlabeled", n_unl)):
        (dest / split).mkdir()
        for f in sorted((sample_dir / split).glob(f"{split}_*.jpg"))[:n]:
            shutil.copy(f, dest / split / f.name)
    return dest / "labeled", dest / "unlabeled"


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def write_odd_images(folder: Path) -> dict[str, str]:
    """Every mode and oddity the reader must handle. Returns name -> expected outcome
    ('ok' or the failure reason's kind)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8))
    out = {}
    rgb.convert("L").save(folder / "mode_L.png"); out["mode_L.png"] = "ok"
    rgb.convert("P").save(folder / "mode_P.png"); out["mode_P.png"] = "ok"
    rgba = rgb.convert("RGBA"); rgba.putalpha(128); rgba.save(folder / "mode_RGBA.png"); out["mode_RGBA.png"] = "ok"
    rgb.convert("CMYK").save(folder / "mode_CMYK.jpg"); out["mode_CMYK.jpg"] = "ok"
    Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)).save(folder / "mode_I16.png"); out["mode_I16.png"] = "ok"
    rgb.save(folder / "plain.webp"); out["plain.webp"] = "ok"
    rgb.save(folder / "plain.bmp"); out["plain.bmp"] = "ok"
    rgb.save(folder / "plain.tiff"); out["plain.tiff"] = "ok"
    frames = [rgb.convert("P"), rgb.rotate(90).convert("P")]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], transparency=0); out["animated.gif"] = "ok"
    exif = Image.Exif(); exif[0x0112] = 6  # rotate 90
    rgb.save(folder / "exif_rotated.jpg", exif=exif); out["exif_rotated.jpg"] = "ok"
    good = jpeg_bytes(rgb)
    (folder / "zero.jpg").write_bytes(b""); out["zero.jpg"] = "empty file"
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2]); out["truncated.jpg"] = "truncated"
    (folder / "text.png").write_bytes(b"hello, not an image\n" * 10); out["text.png"] = "not an image"
    corrupt = bytearray(good); corrupt[200:260] = b"\x00" * 60; corrupt[2:4] = b"\xff\xff"
    (folder / "corrupt_header.jpg").write_bytes(bytes(corrupt)); out["corrupt_header.jpg"] = "any"
    Image.new("1", (10000, 10000)).save(folder / "bomb.png"); out["bomb.png"] = "too large"
    os.symlink(folder / "does-not-exist.jpg", folder / "dangling.jpg"); out["dangling.jpg"] = "not found"
    return out


@pytest.fixture(scope="session")
def odd_dir(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("odd")
    return root, write_odd_images(root)
