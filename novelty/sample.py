"""A small generated image set for demos and tests: scenes in a few visual domains,
clusters of near-copies, a labeled part that covers only some domains, and a few
broken files, so every stage of the pipeline has something to show."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DOMAINS = [  # (top colour, bottom colour, texture noise)
    ((40, 90, 160), (200, 220, 240), 6),  # sky / street
    ((20, 90, 30), (120, 180, 60), 18),  # grass
    ((90, 60, 40), (200, 170, 120), 30),  # sand, rough
    ((10, 10, 30), (60, 60, 90), 4),  # night
    ((150, 150, 150), (240, 240, 240), 10),  # overcast
    ((120, 20, 20), (240, 140, 60), 12),  # dusk
]


@dataclass(frozen=True)
class SampleCfg:
    n_labeled: int = 60
    n_unlabeled: int = 240
    size: int = 160
    labeled_domains: int = 2  # the labeled set covers only the first few domains
    copies: int = 4  # near-copies per scene
    broken: bool = True
    seed: int = 0


def scene(rng: np.random.Generator, domain: int, size: int) -> tuple[Image.Image, np.ndarray]:
    """One image with up to 3 objects of 2 classes; returns it and its class mask."""
    top, bottom, noise = DOMAINS[domain % len(DOMAINS)]
    t = np.linspace(0, 1, size)[:, None, None]
    bg = (1 - t) * np.array(top) + t * np.array(bottom)
    bg = np.broadcast_to(bg, (size, size, 3)) + rng.normal(0, noise, (size, size, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    draw, mdraw = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.integers(1, 3))
        r = int(rng.integers(size // 10, size // 4))
        cx, cy = rng.integers(r, size - r, 2)
        box = [int(cx - r), int(cy - r), int(cx + r), int(cy + r)]
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if cls == 1 else draw.rectangle)(box, fill=color)
        (mdraw.ellipse if cls == 1 else mdraw.rectangle)(box, fill=cls)
    return img, np.asarray(mask)


def near_copy(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A slightly shifted, blurred or re-lit copy of an image."""
    dx, dy = rng.integers(-4, 5, 2)
    out = img.transform(img.size, Image.AFFINE, (1, 0, int(dx), 0, 1, int(dy)), fillcolor=(128, 128, 128))
    if rng.random() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    a = np.asarray(out, dtype=np.float32) * rng.uniform(0.9, 1.1)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def write_broken(folder: Path, good_jpeg: bytes) -> list[Path]:
    """Files every reader meets in real data: zero bytes, truncated, not an image."""
    files = {
        "broken_empty.jpg": b"",
        "broken_truncated.jpg": good_jpeg[: len(good_jpeg) // 3],
        "broken_not_an_image.png": b"this is a text file, not a PNG\n" * 8,
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / n for n in files]


def make_sample(root: Path, cfg: SampleCfg = SampleCfg()) -> dict:
    """Write root/labeled and root/unlabeled. Returns counts: labeled, unlabeled (the
    generated images), copies (exact copies of labeled images put in unlabeled/), broken."""
    rng = np.random.default_rng(cfg.seed)
    counts = {}
    for split, n, domains in (("labeled", cfg.n_labeled, cfg.labeled_domains), ("unlabeled", cfg.n_unlabeled, len(DOMAINS))):
        folder = Path(root) / split
        folder.mkdir(parents=True, exist_ok=True)
        written = 0
        while written < n:
            base, _ = scene(rng, int(rng.integers(0, domains)), cfg.size)
            for c in range(min(cfg.copies, n - written)):
                im = base if c == 0 else near_copy(base, rng)
                ext = "png" if written % 7 == 3 else "jpg"
                im.save(folder / f"{split}_{written:05d}.{ext}", quality=90)
                written += 1
        counts[split] = written
    # an exact byte copy of a labeled image, dropped among the unlabeled ones
    first = Path(root) / "labeled" / "labeled_00000.jpg"
    (Path(root) / "unlabeled" / "copy_of_labeled_00000.jpg").write_bytes(first.read_bytes())
    counts["copies"] = 1
    if cfg.broken:
        good = (Path(root) / "unlabeled" / "unlabeled_00000.jpg").read_bytes()
        counts["broken"] = len(write_broken(Path(root) / "unlabeled", good))
    return counts
