"""MC dropout: T stochastic passes with only the dropout layers sampling.

Mode. Inside ``MCDropout(model, seed)`` the whole model is in eval mode, so BatchNorm
normalises with its running statistics and never updates them, and every dropout layer
(nn.Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout) is given a seeded
mask by a forward hook (in eval mode the layer itself is the identity). On exit the
hooks are removed and every module's train/eval flag is restored. A model without
dropout layers is refused with ModelError (see ``inject.py`` to add some).

Batched passes. ``sample(images, T)`` repeats the batch T times along the batch dim:
[T*B, ...], row r is pass r // B of image r % B, and runs ONE forward. ``max_batch``
caps the rows of one forward; whole passes are then grouped per forward (max_batch = B
gives T forwards of the batch; below B a pass is split). When a forward runs out of
memory the cap is halved, for this and later batches, and the batch redone. Detection outputs (a list of T*B dicts)
and segmentation logits ([T*B, C, H, W] or a dict with 'out') come back in row order;
``per_image`` regroups them.

Shared trunk. By default (``share_trunk``) the largest sub-modules that no dropout
layer touches (a backbone, an encoder) run once per image rather than once per pass,
and their output is repeated for the passes (trunk.py); the scores are the same up to
float rounding. At T = 10 this made a small CPU detector 2.4x faster, box matching
included (benchmarks/uncertainty_throughput.py).

Seeding. The mask of pass t at the l-th dropout layer (``model.modules()`` order) is
drawn from a generator on the input's device seeded with ``SeedSequence([seed, l, t])``,
for the per-image shape of the layer's input (per channel for the feature dropouts),
and is the same for every image of pass t: the T passes are T fixed sub-networks,
shared by all images. A score therefore depends only on the image, the seed, T and the
device type, not on the batch the image is in, its position or ``max_batch`` (up to
float rounding: kernels may round differently with the batch size; and images whose
activations are padded to the batch's largest, as torchvision's detectors do, see a
mask of the padded shape). CPU and CUDA draw different masks. The exception is a
dropout layer whose input's leading dim is not the T*B rows (e.g. RoI heads that pool
the proposals of all images into one batch): it draws one mask per call, seeded with
(seed, l, call number), so a command repeated gives the same scores, but they depend on
batch composition. That is logged once per layer.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ModelError
from .trunk import TrunkSharing

log = logging.getLogger(__name__)

DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_FEATURE = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout)  # one draw per channel
_ALPHA = (nn.AlphaDropout, nn.FeatureAlphaDropout)
_SELU_ALPHA = 1.7580993408473766  # as in ATen's alpha_dropout
_FREE_STREAM = 1 << 30  # seed stream offset of per-call masks
_CACHE_LIMIT = 1 << 24  # mask elements kept for reuse by batches of the same shape


def find_dropout(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The dropout layers MC sampling acts on, in ``model.modules()`` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DROPOUT_TYPES)]


def derive_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0])


def _noise(u: torch.Tensor, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Uniform draws -> (mult, add): the layer computes x * mult + add."""
    p = float(module.p)
    keep = (u >= p).to(u.dtype)  # P(keep) = 1 - p
    if p >= 1.0:
        return torch.zeros_like(u), None
    if isinstance(module, _ALPHA):
        a = ((_SELU_ALPHA**2 * p + 1.0) * (1.0 - p)) ** -0.5
        return keep * a, (keep - 1.0 + p) * (_SELU_ALPHA * a)
    return keep / (1.0 - p), None


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _rows_of(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and isinstance(out.get("out"), torch.Tensor):
        return out["out"]
    if isinstance(out, (list, tuple)):
        return list(out)
    raise ModelError(f"the model returned {type(out).__name__}; expected a list of dicts (detection), "
                     "a tensor or a dict with 'out' (segmentation)")


def _repeat(images, sl: slice, n: int):
    if isinstance(images, torch.Tensor):
        x = images[sl]
        return x.repeat(n, *([1] * (x.dim() - 1)))
    return list(images[sl]) * n


class MCDropout:
    """Context manager: seeded MC-dropout sampling of ``model`` (module docstring)."""

    def __init__(self, model: nn.Module, seed: int = 0, max_batch: int | None = None, share_trunk: bool = True):
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        if max_batch is not None and max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.layers = find_dropout(model)
        if not self.layers:
            raise ModelError("the model has no dropout layer (nn.Dropout, Dropout1d/2d/3d, AlphaDropout, "
                             "FeatureAlphaDropout), so MC dropout has nothing to sample; add dropout before "
                             "its head layers with --inject-dropout P")
        if all(m.p == 0 for _, m in self.layers):
            log.warning("every dropout layer has p = 0: all passes agree and every score is 0")
        self.model, self.seed = model, int(seed)
        self.max_rows = max_batch  # rows per forward; None: all
        self.oom_rows: int | None = None  # lowered after running out of memory, kept for later batches
        self._chunk: tuple[tuple[int, ...], int] | None = None  # (passes, images) of the forward in flight
        self._cache: dict = {}
        self._cached = 0
        self._calls: dict[int, int] = {}
        self._handles: list = []
        self._modes: list = []
        self._reuse = False  # a later forward of this batch runs the same images (trunk.py)
        self._start = 0
        self.trunk = TrunkSharing(model, DROPOUT_TYPES, self._forward_info) if share_trunk else None

    def __enter__(self) -> MCDropout:
        self._modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self._calls.clear()
        self._handles = [m.register_forward_hook(functools.partial(self._hook, i, name))
                         for i, (name, m) in enumerate(self.layers)]
        if self.trunk is not None:
            self.trunk.install()
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.trunk is not None:
            self.trunk.remove()
        for m, flag in self._modes:
            m.training = flag

    # -- masks ---------------------------------------------------------------------------
    def _pass_noise(self, idx: int, module: nn.Module, ts: tuple[int, ...], row_shape: tuple, x: torch.Tensor):
        key = (idx, ts, row_shape, float(module.p), x.dtype, x.device)
        hit = self._cache.get(key)
        if hit is None:
            u = torch.stack([torch.rand(row_shape, device=x.device, generator=torch.Generator(x.device).manual_seed(
                derive_seed(self.seed, idx, t))) for t in ts])  # [U, *row_shape]
            mult, add = _noise(u, module)
            hit = (mult.to(x.dtype), None if add is None else add.to(x.dtype))
            if self._cached + mult.numel() > _CACHE_LIMIT:
                self._cache.clear()
                self._cached = 0
            if mult.numel() <= _CACHE_LIMIT:
                self._cache[key] = hit
                self._cached += mult.numel()
        return hit

    def _free_noise(self, idx: int, name: str, module: nn.Module, x: torch.Tensor):
        n = self._calls[idx] = self._calls.get(idx, 0) + 1
        if n == 1:
            log.info("dropout layer %s: leading dim %d is not the %d rows of the forward; its masks are "
                     "drawn per call (reproducible, but dependent on batch composition)",
                     name or "<root>", x.shape[0] if x.dim() else 0, len(self._chunk[0]) * self._chunk[1])
        shape = tuple(x.shape)
        if isinstance(module, _FEATURE) and x.dim() >= 2:
            shape = shape[:2] + (1,) * (x.dim() - 2)
        g = torch.Generator(device=x.device).manual_seed(derive_seed(self.seed, idx, _FREE_STREAM + n))
        return _noise(torch.rand(shape, generator=g, device=x.device, dtype=x.dtype), module)

    def _hook(self, idx: int, name: str, module: nn.Module, args, output):
        if self._chunk is None or module.p == 0 or not args or not isinstance(args[0], torch.Tensor):
            return None  # not sampling: eval-mode identity
        x = args[0]
        ts, nb = self._chunk
        feature = isinstance(module, _FEATURE)
        if x.dim() >= 1 + feature and x.shape[0] == len(ts) * nb:
            row_shape = tuple(x.shape[1:]) if not feature else (x.shape[1],) + (1,) * (x.dim() - 2)
            mult, add = self._pass_noise(idx, module, ts, row_shape, x)
            xv = x.reshape(len(ts), nb, *x.shape[1:])  # [U, B, ...]
            out = xv * mult.unsqueeze(1)
            if add is not None:
                out = out + add.unsqueeze(1)
            return out.reshape(x.shape)
        mult, add = self._free_noise(idx, name, module, x)
        return x * mult if add is None else x * mult + add

    # -- forwards ------------------------------------------------------------------------
    def plan(self, n_images: int, passes: int) -> list[tuple[tuple[int, ...], slice]]:
        """The forwards of one batch: (passes, image slice) each, in row order."""
        R = min(r for r in (self.max_rows, self.oom_rows, passes * n_images) if r)
        if R >= n_images:
            per = min(passes, R // n_images)
            return [(tuple(range(t, min(passes, t + per))), slice(0, n_images)) for t in range(0, passes, per)]
        return [((t,), slice(b, min(n_images, b + R))) for t in range(passes) for b in range(0, n_images, R)]

    def _forward_info(self):
        """For trunk.py: (passes, images, first image, reuse) of the forward in flight, or None."""
        return None if self._chunk is None else (*self._chunk, self._start, self._reuse)

    def _run(self, images, n_images: int, passes: int):
        parts = []
        plan = self.plan(n_images, passes)
        self._reuse = len({sl.indices(n_images) for _, sl in plan}) < len(plan)
        if self.trunk is not None:
            self.trunk.new_batch()
        try:
            for ts, sl in plan:
                inp = _repeat(images, sl, len(ts))
                start, stop, _ = sl.indices(n_images)
                self._chunk, self._start = (ts, stop - start), start
                if self.trunk is not None:
                    self.trunk.new_forward()
                try:
                    with torch.inference_mode():
                        parts.append(_rows_of(self.model(inp)))
                finally:
                    self._chunk = None
        finally:
            if self.trunk is not None:
                self.trunk.new_batch()  # the kept trunk outputs live for one batch
        rows = torch.cat(parts) if isinstance(parts[0], torch.Tensor) else [r for p in parts for r in p]
        if len(rows) != passes * n_images:
            raise ModelError(f"the model returned {len(rows)} outputs for {passes * n_images} inputs")
        return rows

    def sample(self, images: torch.Tensor | Sequence[torch.Tensor], passes: int):
        """Outputs of the T*B rows in row order (t-major): a list or a tensor [T*B, ...]."""
        assert self._handles, "MCDropout.sample must run inside `with MCDropout(...)`"
        if passes < 1:
            raise ConfigError(f"passes must be >= 1, got {passes}")
        n_images = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
        while True:
            try:
                return self._run(images, n_images, passes)
            except Exception as e:
                rows = max(len(ts) * len(range(*sl.indices(n_images))) for ts, sl in self.plan(n_images, passes))
                if not _is_oom(e) or rows <= 1:
                    raise
                self.oom_rows = rows // 2
                log.warning("out of memory with %d rows per forward; retrying with %d", rows, self.oom_rows)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


def per_image(rows, passes: int, n_images: int) -> list:
    """Row-order outputs -> one entry per image: a list of T outputs, or a tensor [T, ...]."""
    if isinstance(rows, torch.Tensor):
        rows = rows.reshape(passes, n_images, *rows.shape[1:])
        return [rows[:, b] for b in range(n_images)]
    return [[rows[t * n_images + b] for t in range(passes)] for b in range(n_images)]


def mc_forward(model: nn.Module, images, passes: int, seed: int = 0, max_batch: int | None = None) -> list:
    """One-shot convenience: per image, the T pass outputs (see ``per_image``)."""
    n_images = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
    with MCDropout(model, seed, max_batch) as mc:
        return per_image(mc.sample(images, passes), passes, n_images)
