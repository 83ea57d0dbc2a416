"""MC-dropout uncertainty throughput (images/s): T passes as one batched forward vs loops.

    python benchmarks/uncertainty_throughput.py --device cpu --batch-size 8 --n 32 --size 320

A small single-stage CNN detector (stride-16 backbone with BatchNorm, a dropout head,
3 anchors per cell, top 100 boxes per image; about 0.36 GMAC per 320x320 image; random
weights, since speed does not depend on them, but BatchNorm statistics calibrated on
random images, so that a few boxes per image, 2.6 on average, sit just above the 0.5
score threshold and flicker under dropout, and box matching does real work; before
session 6 every box scored 0.269 and every image 0) scores --n random images with T in
{5, 10, 20} passes, in ways that draw the same masks and so give the same scores:

  batched   the batch repeated T times, [T*B, 3, H, W], ONE forward (max_batch = T*B;
            the default on a GPU)
  auto      the default (max_batch = None): on the CPU, forwards of about 0.5 Mpixel
            of input (CPU_PIXELS_PER_FORWARD), on a GPU the same as batched
  per-pass  T forwards of the batch (max_batch = B)
  per-image T*B forwards of one image (max_batch = 1)

each with the trunk shared (the default: the backbone, which no dropout layer touches,
runs once per image and its output is repeated for the passes; novelty/uncertainty/trunk.py)
and, for auto and per-image, without (every pass runs the whole model; per-image
unshared is the naive loop).

Figures are images/s end to end through ``score_batches`` (forwards + box matching
and scoring), the best of --repeat runs. `max|d|` is the largest score difference
between all the ways (float rounding only).

--precision fp32 bf16 [fp16] adds a table: the default way (auto, shared) with its passes
under torch.autocast at each precision (`novelty uncertainty --precision`), its rate and
speed-up over fp32, and how far its scores move from fp32's (largest and mean |d|, rank
correlation). fp16 runs on CUDA only.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from novelty.uncertainty import UncertaintyCfg, score_batches  # noqa: E402
from novelty.uncertainty.runner import PRECISIONS  # noqa: E402


def conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallDetector(nn.Module):
    """Single-stage detector, torchvision-style output with ``probs``."""

    def __init__(self, num_classes: int = 2, anchors: int = 3, p: float = 0.2, top: int = 100):
        super().__init__()
        self.C, self.A, self.top, self.stride = num_classes, anchors, top, 16
        self.backbone = nn.Sequential(conv_bn(3, 24, 2), conv_bn(24, 32, 2), conv_bn(32, 32, 1),
                                      conv_bn(32, 64, 2), conv_bn(64, 64, 1), conv_bn(64, 128, 2), conv_bn(128, 128, 1))
        self.neck = nn.Sequential(nn.Dropout(p), conv_bn(128, 128, 1), nn.Dropout(p))
        self.head = nn.Conv2d(128, anchors * (1 + num_classes + 4), 1)
        nn.init.constant_(self.head.bias, -1.0)
        self.sizes = torch.tensor([32.0, 64.0, 128.0])[:anchors]

    def forward(self, images):
        x = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
        o = self.head(self.neck(self.backbone(x)))  # [N, A*(1+C+4), h, w]
        N, _, h, w = o.shape
        o = o.reshape(N, self.A, 1 + self.C + 4, h, w).permute(0, 3, 4, 1, 2).reshape(N, -1, 1 + self.C + 4)
        ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
        ctr = (torch.stack([xs, ys], -1).reshape(-1, 1, 2).float() + 0.5) * self.stride  # [h*w, 1, 2]
        half = self.sizes.to(x.device).reshape(1, -1, 1) / 2  # [1, A, 1]
        anchors = torch.cat([ctr - half, ctr + half], -1).reshape(-1, 4)  # [h*w*A, 4]
        scores = torch.sigmoid(o[..., 0])
        probs = torch.softmax(o[..., 1:1 + self.C], -1)
        boxes = anchors + o[..., 1 + self.C:] * self.stride
        k = min(self.top, scores.shape[1])
        idx = scores.topk(k, dim=1).indices  # [N, k]
        out = []
        for i in range(N):
            j = idx[i]
            out.append({"boxes": boxes[i, j], "scores": scores[i, j], "labels": probs[i, j].argmax(-1), "probs": probs[i, j]})
        return out


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """BatchNorm running statistics of `images` (one train-mode forward, cumulative
    average), as a trained model has them; then eval mode. Without it a random-weight
    net's activations shrink layer by layer and the head outputs its bias alone."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


def run(model, images: torch.Tensor, batch: int, passes: int, max_batch: int | None, device: str,
        share: bool = True, precision: str = "fp32") -> np.ndarray:
    batches = [(list(range(i, min(i + batch, len(images)))), images[i:i + batch]) for i in range(0, len(images), batch)]
    cfg = UncertaintyCfg(kind="detection", passes=passes, device=device, max_batch=max_batch, share_trunk=share,
                         precision=precision)
    return np.array([r.score for r in score_batches(model, batches, cfg)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n", type=int, default=32, help="images per measurement")
    ap.add_argument("--size", type=int, nargs="+", default=[320])
    ap.add_argument("--passes", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=list(PRECISIONS),
                    help="more than fp32: also a table of the default way at each precision")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    torch.manual_seed(0)
    calib = torch.rand(32, 3, 320, 320, generator=torch.Generator().manual_seed(1))
    model = calibrate_batchnorm(SmallDetector(), calib).to(device)
    dev = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    for size in args.size:
        bench(model, size, args, device, dev)


def bench(model, size: int, args, device: str, dev: str) -> None:
    images = torch.rand(args.n, 3, size, size, generator=torch.Generator().manual_seed(0))
    B = args.batch_size
    run(model, images[:B], B, 2, None, device)  # warm up
    print(f"\nSmallDetector {size}x{size}, B={B}, n={args.n}, device: {dev}, torch {torch.__version__}")
    modes = {"batched": ("T*B", True), "auto": (None, True), "per-pass": ("B", True), "per-image": (1, True),
             "auto, unshared": (None, False), "per-image, unshared": (1, False)}
    print("| T | " + " | ".join(modes) + " | auto: shared / unshared | max abs diff |")
    print("|---" * (len(modes) + 3) + "|")
    for T in args.passes:
        best, scores = {}, {}
        for name, (mb, share) in modes.items():
            mb = T * B if mb == "T*B" else B if mb == "B" else mb
            sec, scores[name] = timed(lambda: run(model, images, B, T, mb, device, share), args.repeat, device)
            best[name] = args.n / sec
        diff = max(np.abs(scores[m] - scores["batched"]).max() for m in modes)
        print(f"| {T} | " + " | ".join(f"{best[m]:.1f}" for m in modes)
              + f" | {best['auto'] / best['auto, unshared']:.2f}x | {diff:.1e} |")
    if [p for p in args.precision if p != "fp32"]:
        precisions(model, images, B, args, device)


def timed(fn, repeat: int, device: str):
    """-> (the best seconds of `repeat` calls, the last call's result)."""
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times), out


def precisions(model, images: torch.Tensor, B: int, args, device: str) -> None:
    rank = lambda v: np.argsort(np.argsort(v, kind="stable"), kind="stable")  # noqa: E731
    print(f"\nThe default way (auto, trunk shared) at each precision, n={len(images)}:")
    print("| T | precision | images/s | vs fp32 | max abs diff | mean abs diff | mean score | rank corr. with fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for T in args.passes:
        ref = None
        for p in ["fp32", *[p for p in args.precision if p != "fp32"]]:
            run(model, images[:B], B, 2, None, device, True, p)  # warm up the kernels of this dtype
            sec, s = timed(lambda: run(model, images, B, T, None, device, True, p), args.repeat, device)
            if ref is None:
                ref = (sec, s)
            d = np.abs(s - ref[1])
            corr = np.corrcoef(rank(s), rank(ref[1]))[0, 1] if np.ptp(s) and np.ptp(ref[1]) else float("nan")
            print(f"| {T} | {p} | {len(images) / sec:.1f} | {ref[0] / sec:.2f}x | {d.max():.1e} | {d.mean():.1e} | "
                  f"{s.mean():.3f} | {corr:.4f} |")


if __name__ == "__main__":
    main()
