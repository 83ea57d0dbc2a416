"""The active-learning benchmark's segmenter: a small U-Net with MC dropout, its
training, its test metric, and the factory `novelty uncertainty` loads.

    novelty uncertainty --detector benchmarks/_al_model.py:factory --kind segmentation

`factory()` takes no arguments (the contract in novelty/uncertainty/model.py): it reads
the weights file named by the environment variable NOVELTY_AL_WEIGHTS, which the
benchmark points at the model of the current round. Inputs are RGB in [0, 1], the
default preprocess, so the factory returns the module alone.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

WEIGHTS_ENV = "NOVELTY_AL_WEIGHTS"
NUM_CLASSES = 3  # background, disc, square


def _cbr(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """Two down, two up (one conv at full resolution, two below); Dropout2d on the
    bottleneck and before the head (MC dropout). [B, 3, S, S] -> logits [B, 3, S, S],
    S divisible by 4. About 0.03 s per training step of 32 images on one CPU thread."""

    def __init__(self, width: int = 16, p: float = 0.2):
        super().__init__()
        w = width
        self.enc1 = _cbr(3, w)
        self.enc2 = nn.Sequential(_cbr(w, 2 * w), _cbr(2 * w, 2 * w))
        self.mid = nn.Sequential(_cbr(2 * w, 4 * w), _cbr(4 * w, 4 * w))
        self.drop_mid = nn.Dropout2d(p)
        self.dec2, self.dec1 = _cbr(6 * w, 2 * w), _cbr(3 * w, w)
        self.drop_head = nn.Dropout2d(p)
        self.head = nn.Conv2d(w, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.drop_mid(self.mid(F.max_pool2d(e2, 2)))
        d2 = self.dec2(torch.cat([F.interpolate(m, scale_factor=2.0), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))
        return self.head(self.drop_head(d1))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """[n, S, S, 3] uint8 -> [n, 3, S, S] float32 in [0, 1] (what default_preprocess gives)."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float().div_(255.0)


def train(images: np.ndarray, masks: np.ndarray, steps: int, seed: int, batch: int = 32, lr: float = 3e-3,
          precision: str = "fp32") -> UNet:
    """A fresh UNet trained for `steps` Adam steps on random batches (flips as
    augmentation), one-cycle learning rate. Deterministic in (data, steps, seed, precision).
    channels_last: about 1.5x faster on a CPU for these small convolutions. precision bf16:
    the forward under torch.autocast(bfloat16), the loss in fp32; 1.4x faster on a CPU with
    AVX512-BF16, and fixed labeled sets score the same (RESULTS.md, *bf16*)."""
    from novelty.uncertainty.runner import autocast  # the passes' autocast: one meaning of "precision"

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = to_tensor(images).contiguous(memory_format=torch.channels_last), torch.from_numpy(masks.astype(np.int64))
    model = UNet().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 2), pct_start=0.15)
    model.train()
    for _ in range(steps):
        i = torch.randint(0, len(x), (min(batch, len(x)),), generator=g)
        xb, yb = x[i], y[i]
        if torch.rand(1, generator=g).item() < 0.5:
            xb, yb = xb.flip(-1), yb.flip(-1)
        if torch.rand(1, generator=g).item() < 0.5:
            xb, yb = xb.flip(-2), yb.flip(-2)
        with autocast(precision, x.device):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.inference_mode()
def predict(model: UNet, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """[n, S, S, 3] uint8 -> [n, S, S] uint8 class map (dropout off)."""
    model.eval()
    return np.concatenate([model(to_tensor(images[s:s + batch]).contiguous(memory_format=torch.channels_last))
                           .argmax(1).numpy().astype(np.uint8)
                           for s in range(0, len(images), batch)])


@torch.inference_mode()
def features(model: UNet, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """[n, S, S, 3] uint8 -> [n, 8w] float32: average- and max-pooled bottleneck
    activations (before its dropout), the model's own view of an image."""
    model.eval()
    out = []
    for s in range(0, len(images), batch):
        x = to_tensor(images[s:s + batch]).contiguous(memory_format=torch.channels_last)
        m = model.mid(F.max_pool2d(model.enc2(F.max_pool2d(model.enc1(x), 2)), 2))  # [b, 4w, S/4, S/4]
        out.append(torch.cat([m.mean((2, 3)), m.amax((2, 3))], 1).numpy())
    return np.concatenate(out).astype(np.float32)


def load(path) -> UNet:
    model = UNet()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(memory_format=torch.channels_last).eval()


def iou_counts(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[2, 2] intersections and unions of the two foreground classes (rows: class 1, 2)."""
    out = np.zeros((2, 2), np.int64)
    for k in (1, 2):
        p, t = pred == k, truth == k
        out[k - 1] = (p & t).sum(), (p | t).sum()
    return out


def image_errors(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[n] per-image error: 1 - the mean IoU of the foreground classes that appear in the
    prediction or the truth (0 if neither class appears in either: nothing to get wrong)."""
    return np.array([1 - np.mean([c[0] / c[1] for c in iou_counts(p, t) if c[1]] or [1.0])
                     for p, t in zip(pred, truth)])


def miou(counts: np.ndarray) -> float:
    """Mean over the foreground classes of intersection / union (dataset-level counts)."""
    return float(np.mean(counts[:, 0] / np.maximum(counts[:, 1], 1)))


def evaluate(model: UNet, images: np.ndarray, masks: np.ndarray, domain: np.ndarray) -> dict:
    """-> {'miou': overall, 'by_domain': [mIoU per domain id]}: foreground classes only."""
    pred = predict(model, images)
    by_domain = [miou(iou_counts(pred[domain == d], masks[domain == d])) for d in range(int(domain.max()) + 1)]
    return {"miou": miou(iou_counts(pred, masks)), "by_domain": by_domain}


def save(model: UNet, path) -> None:
    tmp = f"{path}.tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)


def factory() -> UNet:
    """For `novelty uncertainty --detector benchmarks/_al_model.py:factory`."""
    path = os.environ.get(WEIGHTS_ENV)
    if not path:
        raise RuntimeError(f"set {WEIGHTS_ENV} to the weights file of the model to score with")
    return load(path)
