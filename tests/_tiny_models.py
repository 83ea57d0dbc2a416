"""Tiny dropout models and synthetic data for the uncertainty tests (torch only, CPU).

Images are 32x32: a black background with noise and one or two 4x4 squares aligned to
a 4-pixel grid, red (class 0) or green (class 1). The detector predicts, per grid
cell (8x8 = 64 cells), an objectness score, a class and a box near the cell; the
segmenter predicts background / red / green per pixel.
"""
from __future__ import annotations

import torch
from torch import nn

SIZE, CELL = 32, 4
GRID = SIZE // CELL


def make_scenes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> images [n, 3, 32, 32] in [0, 1], cell labels [n, 8, 8] (0 empty, 1 red, 2 green)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.1
    cells = torch.zeros(n, GRID, GRID, dtype=torch.long)
    for i in range(n):
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            r, c = torch.randint(0, GRID, (2,), generator=g).tolist()
            k = int(torch.randint(0, 2, (1,), generator=g))
            cells[i, r, c] = k + 1
            x[i, :, r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = 0.1
            x[i, k, r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = 0.9
    return x, cells


def blocky_noise(n: int, seed: int) -> torch.Tensor:
    """Out-of-distribution images [n, 3, 32, 32]: a random colour per grid cell."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, GRID, GRID, generator=g).repeat_interleave(CELL, 2).repeat_interleave(CELL, 3)


def _backbone(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
    )


class TinyDetector(nn.Module):
    """torchvision-style output: a list of dicts with boxes, scores, labels, probs (64 per image)."""

    def __init__(self, p: float = 0.2, width: int = 16, num_classes: int = 2):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = nn.Sequential(_backbone(width), nn.MaxPool2d(CELL))  # [B, w, 8, 8]
        self.dropout = nn.Dropout(p)
        self.head = nn.Conv2d(width, 1 + num_classes + 4, 1)
        ys, xs = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
        cells = torch.stack([xs, ys, xs + 1, ys + 1], -1).reshape(-1, 4).float() * CELL
        self.register_buffer("cells", cells, persistent=False)  # [64, 4]

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x)))  # [B, 1 + C + 4, 8, 8]

    def forward(self, images):
        x = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
        o = self.raw(x).flatten(2).transpose(1, 2)  # [B, 64, 1 + C + 4]
        C = self.num_classes
        scores = torch.sigmoid(o[..., 0])
        probs = torch.softmax(o[..., 1:1 + C], -1)
        boxes = self.cells + CELL * torch.tanh(o[..., 1 + C:])
        return [{"boxes": b, "scores": s, "labels": p.argmax(-1), "probs": p}
                for b, s, p in zip(boxes, scores, probs)]


class TinySegmenter(nn.Module):
    """Logits [B, 3, 32, 32] (background, red, green)."""

    def __init__(self, p: float = 0.2, width: int = 16):
        super().__init__()
        self.backbone = _backbone(width)
        self.dropout = nn.Dropout2d(p)
        self.head = nn.Conv2d(width, 3, 1)

    def forward(self, x):
        return self.head(self.dropout(self.backbone(x)))


def train_detector(model: TinyDetector, steps: int = 300, seed: int = 0, batch: int = 32) -> TinyDetector:
    torch.manual_seed(seed)
    x, cells = make_scenes(512, seed)
    obj_t = (cells > 0).float().flatten(1)  # [n, 64]
    cls_t = (cells - 1).clamp_min(0).flatten(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        i = torch.randint(0, x.shape[0], (batch,))
        o = model.raw(x[i]).flatten(2).transpose(1, 2)  # [batch, 64, 7]
        pos = obj_t[i] > 0
        loss = nn.functional.binary_cross_entropy_with_logits(o[..., 0], obj_t[i])
        loss = loss + nn.functional.cross_entropy(o[..., 1:3][pos], cls_t[i][pos])
        loss = loss + o[..., 3:].pow(2).mean()  # boxes stay on their cell
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train_segmenter(model: TinySegmenter, steps: int = 300, seed: int = 0, batch: int = 32) -> TinySegmenter:
    torch.manual_seed(seed)
    x, cells = make_scenes(512, seed)
    y = cells.repeat_interleave(CELL, 1).repeat_interleave(CELL, 2)  # [n, 32, 32]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        i = torch.randint(0, x.shape[0], (batch,))
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def make_detector() -> nn.Module:
    """Factory for spec tests: an untrained TinyDetector."""
    torch.manual_seed(0)
    return TinyDetector()


def make_segmenter() -> nn.Module:
    """Factory for spec tests: an untrained TinySegmenter."""
    torch.manual_seed(0)
    return TinySegmenter()


def make_detector_with_preprocess():
    return make_detector(), lambda img: torch.zeros(3, SIZE, SIZE)


def make_plain_cnn() -> nn.Module:
    """No dropout anywhere: MC dropout must refuse it until dropout is injected."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 1))


def broken_factory():
    raise RuntimeError("weights not found\nsecond line")


def not_a_model():
    return 42
