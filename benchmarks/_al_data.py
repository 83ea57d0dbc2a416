"""Synthetic segmentation data for the active-learning benchmark (numpy only).

Scenes of S x S pixels with 1 to 3 objects of 2 classes (1: disc, 2: square) and a
pixel-wise class mask (0 background). Eight visual domains combine a background
texture, a lighting and an object scale:

    0 smooth  day   normal      4 stripes day   normal
    1 grass   day   normal      5 blotchy day   small
    2 smooth  night normal      6 grass   night normal
    3 smooth  dusk  normal      7 smooth  day   large

Redundancy: every split but the test set is drawn as clusters of near-copies of one
base scene (shifted by up to 2 px, re-lit by up to 7%, fresh sensor noise), with
geometric cluster sizes (mean `mean_copies`), as frames of one video are.

Coverage: the labeled seed holds only domains 0 and 1. The pool holds all eight, with
the seed's domains the most common ones (POOL_WEIGHTS: the seed was labeled from the
conditions seen most often). The test set holds all eight equally, one scene per
cluster: every condition the model must work in counts the same.

The seed's redundancy (DataCfg.seed_copies): by default the seed is drawn like the pool,
about 30 base scenes in 300 images, and the round-0 U-Net trained on it scores only
0.29-0.40 mIoU on its own two domains. `seed_copies=1` draws 300 distinct scenes, a
seed the model learns its domains from (session 7, RESULTS.md *A seed the model learns
from*).
The pool's redundancy (DataCfg.mean_copies, `--pool-copies`): with the default 10, the
pool's 6000 images hold about 600 base scenes, and k-center's 750 picks reach about 430 of
them; with 3 it holds about 2000 (session 8, RESULTS.md *A pool the budget cannot
exhaust*).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DOMAINS = [  # (background, lighting, scale)
    ("smooth", "day", "normal"), ("grass", "day", "normal"), ("smooth", "night", "normal"),
    ("smooth", "dusk", "normal"), ("stripes", "day", "normal"), ("blotchy", "day", "small"),
    ("grass", "night", "normal"), ("smooth", "day", "large"),
]
SEED_DOMAINS = (0, 1)
POOL_WEIGHTS = (0.30, 0.25, 0.08, 0.08, 0.08, 0.07, 0.07, 0.07)
RADIUS = {"small": (2, 4), "normal": (3, 7), "large": (8, 12)}  # object half-size at 32 px


@dataclass(frozen=True)
class DataCfg:
    size: int = 32
    n_seed: int = 300
    n_pool: int = 6000
    n_test: int = 1200
    mean_copies: float = 10.0  # mean near-copies per base scene (seed and pool)
    seed: int = 0
    seed_copies: float | None = None  # mean near-copies per base scene in the seed; None: mean_copies


@dataclass
class Split:
    images: np.ndarray  # [n, S, S, 3] uint8
    masks: np.ndarray  # [n, S, S] uint8: 0 background, 1 disc, 2 square
    domain: np.ndarray  # [n] int8
    cluster: np.ndarray  # [n] int32: base scene id (unique across splits)


def _background(rng: np.random.Generator, kind: str, S: int) -> np.ndarray:
    """[S, S, 3] float32 in 0..255."""
    y, x = np.mgrid[0:S, 0:S].astype(np.float32) / S
    if kind == "smooth":
        top, bottom = rng.uniform(40, 120, 3), rng.uniform(150, 240, 3)
        a = top + y[..., None] * (bottom - top)
        return a + rng.normal(0, 4, (S, S, 3))
    if kind == "grass":
        base = np.array([50, 120, 40]) + rng.uniform(-20, 20, 3)
        return base + rng.normal(0, 28, (S, S, 3))
    if kind == "stripes":
        period, phase, angle = rng.uniform(4, 7), rng.uniform(0, 6.3), rng.uniform(0, np.pi)
        t = (np.cos(angle) * x + np.sin(angle) * y) * S
        on = (np.sin(2 * np.pi * t / period + phase) > 0)[..., None]
        c1, c2 = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
        return np.where(on, c1, c2) + rng.normal(0, 4, (S, S, 3))
    if kind == "blotchy":
        coarse = rng.normal(0, 35, (5, 5, 1))
        up = np.kron(coarse, np.ones((S // 4 + 1, S // 4 + 1, 1)))[:S, :S]
        return np.array([190, 160, 110]) + up + rng.normal(0, 8, (S, S, 3))
    raise ValueError(kind)


def _light(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "night":
        return a * 0.3 + np.array([0, 5, 30])
    if kind == "dusk":
        return a * 0.5 + np.array([115, 60, 15])
    return a


def _objects(rng: np.random.Generator, scale: str, S: int) -> list[tuple]:
    lo, hi = RADIUS[scale]
    objs = []
    for _ in range(int(rng.integers(1, 4))):
        r = int(rng.integers(lo, hi + 1))
        cx, cy = rng.uniform(r - 1, S - r, 2)
        objs.append((int(rng.integers(1, 3)), r, cx, cy, rng.uniform(0, 255, 3)))
    return objs


def _render(rng: np.random.Generator, domain: int, bg_seed: int, objs: list[tuple], S: int,
            dx: int, dy: int, gain: float) -> tuple[np.ndarray, np.ndarray]:
    kind, light, _ = DOMAINS[domain]
    a = _background(np.random.default_rng(bg_seed), kind, S)  # the same background for every copy
    mask = np.zeros((S, S), np.uint8)
    y, x = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    for cls, r, cx, cy, color in objs:
        cx, cy = cx + dx, cy + dy
        inside = ((x - cx) ** 2 + (y - cy) ** 2 <= r * r) if cls == 1 else ((abs(x - cx) <= r) & (abs(y - cy) <= r))
        a[inside] = color
        mask[inside] = cls
    a = _light(a, light) * gain + rng.normal(0, 3, (S, S, 3))
    return np.clip(a, 0, 255).astype(np.uint8), mask


def make_split(rng: np.random.Generator, n: int, weights: np.ndarray, S: int, mean_copies: float,
               first_cluster: int) -> Split:
    """n images in clusters of near-copies; a cluster's domain is drawn from `weights`."""
    images = np.empty((n, S, S, 3), np.uint8)
    masks = np.empty((n, S, S), np.uint8)
    domain = np.empty(n, np.int8)
    cluster = np.empty(n, np.int32)
    i, c = 0, first_cluster
    while i < n:
        d = int(rng.choice(len(DOMAINS), p=weights))
        objs, bg_seed = _objects(rng, DOMAINS[d][2], S), int(rng.integers(1 << 31))
        copies = 1 if mean_copies <= 1 else int(rng.geometric(1.0 / mean_copies))
        for k in range(min(copies, n - i)):
            dx, dy = (0, 0) if k == 0 else (int(v) for v in rng.integers(-2, 3, 2))
            gain = 1.0 if k == 0 else float(rng.uniform(0.93, 1.07))
            images[i], masks[i] = _render(rng, d, bg_seed, objs, S, dx, dy, gain)
            domain[i], cluster[i] = d, c
            i += 1
        c += 1
    return Split(images, masks, domain, cluster)


def make_data(cfg: DataCfg) -> dict[str, Split]:
    """-> {'seed', 'pool', 'test'}; deterministic in cfg."""
    rng = np.random.default_rng([cfg.seed, 2024])
    seed_w = np.zeros(len(DOMAINS))
    seed_w[list(SEED_DOMAINS)] = 1.0
    seed_copies = cfg.mean_copies if cfg.seed_copies is None else cfg.seed_copies
    out = {"seed": make_split(rng, cfg.n_seed, seed_w / seed_w.sum(), cfg.size, seed_copies, 0)}
    out["pool"] = make_split(rng, cfg.n_pool, np.asarray(POOL_WEIGHTS), cfg.size, cfg.mean_copies, 1_000_000)
    uniform = np.full(len(DOMAINS), 1.0 / len(DOMAINS))
    out["test"] = make_split(rng, cfg.n_test, uniform, cfg.size, 1.0, 2_000_000)
    return out


def write_pngs(split: Split, folder, prefix: str) -> list[str]:
    """Write split images as lossless PNGs named {prefix}_{i:05d}.png; -> the names."""
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, im in enumerate(split.images):
        name = f"{prefix}_{i:05d}.png"
        Image.fromarray(im).save(folder / name, compress_level=1)
        names.append(name)
    return names
