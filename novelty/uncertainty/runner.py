"""Score images by MC-dropout disagreement: batches of (keys, images) in, one result
per image out. Independent of the catalog: keys are opaque (ids, paths).

    for r in score_batches(model, batches, UncertaintyCfg(kind="detection", passes=10)):
        r.key, r.score, r.error, r.details

Each batch runs its T passes as one batched forward (``mc.py``), then the pure scores
(``detection.py``, ``segmentation.py``). An exception while a batch is scored does not
stop the run: the batch is retried image by image, and an image that fails alone is
yielded with ``score=None`` and ``error`` set to the reason. Masks do not depend on
batch composition, so a retried image scores what it would have scored in its batch.
A model that breaks the output contract, or images that are not tensors [3, H, W]
(a preprocess that breaks its contract), raise ModelError at once: every image would
fail the same way.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, NoveltyError, ModelError
from .detection import DetectionCfg, detection_objects, image_score
from .inject import inject_dropout
from .mc import MCDropout, per_image
from .segmentation import SegmentationCfg, probs_from_logits, segmentation_scores

log = logging.getLogger(__name__)

KINDS = ("detection", "segmentation")
# the dtype the T passes run in under torch.autocast (fp32: no autocast). bf16 keeps
# fp32's range and runs fast on GPUs and on CPUs with AVX512-BF16 or AMX; fp16 only on
# CUDA, where its kernels are. Probabilities and scores are always computed in fp32.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# CPU convolutions slow down per image once a forward's activations leave the cache:
# measured on a 320x320 detector (2-core EPYC, 32 MB L3), 8 rows run at 2.8 ms/image,
# 32 rows at 6 ms/image; at 128x128 the knee is between 40 and 64 rows.
CPU_PIXELS_PER_FORWARD = 1 << 19


@dataclass(frozen=True)
class UncertaintyCfg:
    kind: str = "detection"  # detection | segmentation
    passes: int = 10  # T
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_batch: int | None = None  # rows (images x passes) per forward; None: auto (auto_rows)
    inject_dropout: float = 0.0  # > 0: Dropout(p) before the head layers (inject.py)
    share_trunk: bool = True  # run the modules no dropout touches once per image, not per pass (trunk.py)
    precision: str = "fp32"  # fp32 | bf16 | fp16: the passes under torch.autocast (PRECISIONS)
    detection: DetectionCfg = DetectionCfg()
    segmentation: SegmentationCfg = SegmentationCfg()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"unknown kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if self.passes < 2:
            raise ConfigError(f"passes (--passes) must be >= 2 for passes to disagree, got {self.passes}")
        if self.seed < 0:
            raise ConfigError(f"seed (--seed) must be >= 0, got {self.seed}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}")
        if not 0.0 <= self.inject_dropout < 1.0:
            raise ConfigError(f"inject_dropout (--inject-dropout) must be in [0, 1), got {self.inject_dropout}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class ImageResult:
    key: Hashable
    score: float | None  # None when the image failed
    error: str | None = None
    details: Mapping[str, float] = field(default_factory=dict)  # per-term summaries


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for, but torch sees no CUDA device")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r}") from e


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype the passes run in on `device` (None: fp32, no autocast); ConfigError
    for a precision the device cannot run."""
    dtype = PRECISIONS[precision]
    if dtype is torch.float16 and device.type != "cuda":
        raise ConfigError(f"precision fp16 runs on CUDA only, not on {device}; use bf16 on a CPU")
    return dtype


def autocast(precision: str, device: torch.device):
    """The context the passes run in: torch.autocast for bf16/fp16, nothing for fp32."""
    dtype = autocast_dtype(precision, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def auto_rows(images, device: torch.device) -> int | None:
    """Rows per forward when ``max_batch`` is None: all T*B on a GPU (halved on out of
    memory); on the CPU about ``CPU_PIXELS_PER_FORWARD`` input pixels (5 images of
    320x320, 32 of 128x128), at least one."""
    if device.type != "cpu":
        return None
    shapes = [images.shape] if isinstance(images, torch.Tensor) else [x.shape for x in images]
    pixels = max(int(s[-1]) * int(s[-2]) for s in shapes) if shapes else 1
    return max(1, CPU_PIXELS_PER_FORWARD // max(1, pixels))


def _to_device(images, device: torch.device):
    if isinstance(images, torch.Tensor):
        return images.to(device, non_blocking=True)
    return [x.to(device, non_blocking=True) for x in images]


def _detections(d) -> dict:
    if not isinstance(d, Mapping) or not all(k in d for k in ("boxes", "scores", "labels")):
        got = sorted(d) if isinstance(d, Mapping) else type(d).__name__
        raise ModelError(f"a detection model must return dicts with boxes, scores and labels; got {got}")
    out = {k: d[k].detach().float().cpu().numpy() for k in ("boxes", "scores")}
    out["labels"] = d["labels"].detach().cpu().numpy()
    if d.get("probs") is not None:
        out["probs"] = d["probs"].detach().float().cpu().numpy()
    return out


def _check_images(images) -> None:
    """ModelError unless ``images`` is a tensor [B, C, H, W] or a list of tensors [C, H, W].
    Run anyway, a [B, H, W] batch reaches the model as something else (T*B channels, an
    unbatched image) and the error, if any, blames the model."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 4:
            return
        got = f"a tensor of shape {list(images.shape[1:])}"
    else:
        bad = next((x for x in images if not isinstance(x, torch.Tensor) or x.dim() != 3), None)
        if bad is None:
            return
        got = f"a tensor of shape {list(bad.shape)}" if isinstance(bad, torch.Tensor) else f"a {type(bad).__name__}"
    raise ModelError(f"the preprocess returned {got} for an image; it must return a float tensor [3, H, W]")


def _score_batch(mc: MCDropout, keys: Sequence, images, cfg: UncertaintyCfg, device: torch.device) -> list[ImageResult]:
    n, T = len(keys), cfg.passes
    images = _to_device(images, device)
    mc.max_rows = cfg.max_batch or auto_rows(images, device)
    if cfg.kind == "segmentation" and not isinstance(images, torch.Tensor):
        if len({tuple(x.shape) for x in images}) > 1:  # sizes differ: one image per forward
            return [r for k, x in zip(keys, images) for r in _score_batch(mc, [k], x[None], cfg, device)]
        images = torch.stack(list(images))
    with autocast(cfg.precision, device):
        rows = mc.sample(images, T)
    if cfg.kind == "detection":
        if not isinstance(rows, list):
            raise ModelError("a detection model must return a list of dicts (one per image), got a tensor")
        out = []
        for key, passes in zip(keys, per_image([_detections(r) for r in rows], T, n)):
            if not all(np.isfinite(p[k]).all() for p in passes for k in ("boxes", "scores", "probs") if k in p):
                out.append(ImageResult(key, None, NON_FINITE))  # NaN scores pass no threshold (0), NaN boxes match none (1)
                continue
            obj = detection_objects(passes, cfg.detection)
            details = {"objects": int(obj.score.shape[0])}
            for name, v in (("presence", obj.presence), ("class", obj.class_bald), ("localisation", obj.localisation)):
                details[name] = float(v.max()) if v.shape[0] else 0.0
            out.append(ImageResult(key, image_score(obj, cfg.detection), details=details))
        return out
    if not isinstance(rows, torch.Tensor) or rows.dim() != 4:
        raise ModelError("a segmentation model must return logits [B, C, H, W] or a dict with 'out'; "
                         f"got {type(rows).__name__} {tuple(getattr(rows, 'shape', ()))}")
    probs = probs_from_logits(rows, 1)
    s = segmentation_scores(probs.reshape(T, n, *probs.shape[1:]), cfg.segmentation)
    return [ImageResult(k, float(s["score"][i]), details={"entropy": float(s["entropy"][i]), "bald": float(s["bald"][i])})
            for i, k in enumerate(keys)]


def _one(images, i: int):
    return images[i:i + 1] if isinstance(images, torch.Tensor) else [images[i]]


def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


NON_FINITE = "non-finite score: the model's outputs gave NaN or inf for this image"
WARN_BATCHES = 3  # failing batches warned about one by one; on a million images a broken model would print 100k lines


def _finite(r: ImageResult) -> ImageResult:
    """A NaN or inf score is a failure with its reason, not a score: stored, it would read
    as a score of nothing (SQLite keeps NaN as NULL), counted as scored and never retried."""
    if r.score is not None and not math.isfinite(r.score):
        return ImageResult(r.key, None, NON_FINITE, r.details)
    return r


def prepare_model(model: nn.Module, cfg: UncertaintyCfg) -> nn.Module:
    """Inject dropout when asked and move the model to the device (in place)."""
    if cfg.inject_dropout > 0:
        inject_dropout(model, cfg.inject_dropout)
    return model.to(resolve_device(cfg.device))


def score_batches(model: nn.Module, batches: Iterable[tuple[Sequence[Hashable], object]],
                  cfg: UncertaintyCfg = UncertaintyCfg(),
                  progress: Callable[[int], None] | None = None) -> Iterator[ImageResult]:
    """Yield one ImageResult per image of ``batches``: (keys, images) pairs, images a
    tensor [B, 3, H, W] or a list of B tensors [3, H, W]. ``progress(n)`` is called
    after each batch with its number of images."""
    device = resolve_device(cfg.device)
    autocast_dtype(cfg.precision, device)  # a precision the device cannot run fails before any work
    prepare_model(model, cfg)
    failing = 0  # batches that failed whole: the first few are warned about, the rest are counted by the caller
    with MCDropout(model, cfg.seed, cfg.max_batch, cfg.share_trunk) as mc:
        for keys, images in batches:
            _check_images(images)
            n = len(keys)
            assert n == (images.shape[0] if isinstance(images, torch.Tensor) else len(images)), "keys and images differ in length"
            try:
                results = _score_batch(mc, keys, images, cfg, device)
            except NoveltyError:
                raise
            except Exception as e:
                if n == 1:
                    results = [ImageResult(keys[0], None, _reason(e))]
                else:
                    failing += 1
                    if failing <= WARN_BATCHES:
                        log.warning("a batch of %d images failed (%s); retrying image by image%s", n, _reason(e),
                                    "; further failing batches are retried without a warning each"
                                    if failing == WARN_BATCHES else "")
                    results = []
                    for i, key in enumerate(keys):
                        try:
                            results += _score_batch(mc, [key], _one(images, i), cfg, device)
                        except NoveltyError:
                            raise
                        except Exception as e1:
                            results.append(ImageResult(key, None, _reason(e1)))
            yield from map(_finite, results)
            if progress is not None:
                progress(n)
