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


@pytest.fixture
def unreachable_hub(monkeypatch):
    """The hub's endpoint set to a TEST-NET address nothing answers on, offline mode
    off (conftest turns it on for the whole suite), and no proxy."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://192.0.2.1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(k, raising=False)
    return constants


def test_an_unreachable_hub_turns_offline_mode_on(unreachable_hub, monkeypatch):
    import time

    from novelty.encoder import hub_unreachable

    t = time.monotonic()
    assert hub_unreachable(timeout=0.5) and unreachable_hub.HF_HUB_OFFLINE is True
    assert time.monotonic() - t < 5
    # behind a proxy, the proxy is probed: one that answers may reach the hub, so no offline mode...
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        monkeypatch.setattr(unreachable_hub, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{listener.getsockname()[1]}")
        assert not hub_unreachable(timeout=0.5) and unreachable_hub.HF_HUB_OFFLINE is False
    finally:
        listener.close()
    # ...and one that does not answer is offline mode at once (the hub library retried for 50 s, a line each try)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # the discard port: nothing listens
    assert hub_unreachable(timeout=0.5) and unreachable_hub.HF_HUB_OFFLINE is True
    # the proxy the hub's requests would take, as requests picks it: none for a host NO_PROXY names, and an
    # http:// one only for an http:// hub (QA 14c D8); then the hub itself is probed
    hub = socket.socket()
    hub.bind(("127.0.0.1", 0))
    hub.listen(1)
    try:
        monkeypatch.setattr(unreachable_hub, "ENDPOINT", f"https://127.0.0.1:{hub.getsockname()[1]}")
        for env in ({"NO_PROXY": "127.0.0.1"}, {"HTTPS_PROXY": None, "HTTP_PROXY": "http://127.0.0.1:9"}):
            for k, v in env.items():
                monkeypatch.delenv(k, raising=False) if v is None else monkeypatch.setenv(k, v)
            monkeypatch.setattr(unreachable_hub, "HF_HUB_OFFLINE", False)
            assert not hub_unreachable(timeout=0.5) and unreachable_hub.HF_HUB_OFFLINE is False, env
    finally:
        hub.close()


def test_a_tag_without_network_fails_fast_in_one_line(unreachable_hub):
    import time

    from novelty.errors import EncoderError

    t = time.monotonic()
    try:
        create_encoder(EncoderCfg(model="ViT-B-32", pretrained="laion2b_s34b_b79k", device="cpu"))
    except EncoderError as e:
        assert "could not fetch weights 'laion2b_s34b_b79k'" in str(e) and "\n" not in str(e)
    else:
        pytest.skip("these weights are in the local Hugging Face cache")
    assert time.monotonic() - t < 20  # the probe's 3 s and a model build, not a minute of retries
