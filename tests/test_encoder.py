"""open_clip encoders: reparameterisation of MobileCLIP's train-time branches."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from novelty.config import EncoderCfg
from novelty.encoder import RANDOM_INIT_SEED, create_encoder


def _convs(model) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


@pytest.mark.parametrize("name", ["MobileCLIP2-S0"])
def test_mobileclip_is_reparameterized_with_the_same_embeddings(name):
    from novelty._compat import import_open_clip

    oc = import_open_clip()
    torch.manual_seed(RANDOM_INIT_SEED)  # what create_encoder does for --pretrained none
    plain, _, _ = oc.create_model_and_transforms(name, pretrained=None)
    plain.eval()
    enc = create_encoder(EncoderCfg(model=name, pretrained="none", device="cpu"))
    assert enc.info.get("reparameterized") is True
    assert _convs(enc.model.visual) < _convs(plain.visual)  # branches really were folded
    x = torch.rand(3, 3, enc.image_size, enc.image_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = torch.nn.functional.normalize(plain.encode_image(x).float(), dim=-1).numpy()
    got = enc.encode_images(x)
    assert abs(got - want).max() < 1e-5
    assert (got * want).sum(1).min() > 1 - 1e-6  # the same direction: cosine distance ~ 0


def test_plain_vit_is_left_alone():
    cfg = Path(__file__).parent / "tiny-clip.json"
    enc = create_encoder(EncoderCfg(model=str(cfg), pretrained="none", device="cpu"))
    assert "reparameterized" not in enc.info
