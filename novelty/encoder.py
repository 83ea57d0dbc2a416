"""open_clip encoders: create from a pretrained tag, a local weights file or random
weights; encode image batches and text to L2-normalised float32 vectors."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import EncoderCfg
from .errors import ConfigError, EncoderError

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def register_model_config(model: str) -> str:
    """`--model` may be a JSON model config file (open_clip's format); register it and
    return the name open_clip knows it by (the file's stem)."""
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise ConfigError(f"model config {model} does not exist")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise EncoderError(f"model config {model} is not readable JSON: {e}") from None
        if not (isinstance(cfg, dict) and {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg)):
            raise EncoderError(f"model config {model} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        from ._compat import import_open_clip

        import_open_clip().add_model_config(path)
        return path.stem
    return model


def config_sha256(path: Path) -> str:
    """SHA-256 of a model config's contents (keys sorted, so reformatting the file keeps it)."""
    cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _one_line(e: BaseException) -> str:
    """A library's exception as one line, cut at 240 characters (a state_dict mismatch lists every key)."""
    if isinstance(e, EOFError) and not str(e):
        return "the file is empty or cut short"
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or ["(no message)"]
    text = " ".join(lines)
    return text if len(text) <= 240 else text[:240] + " ..."


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def resolve_weights(model: str, pretrained: str) -> tuple[str | None, dict]:
    """-> (value for open_clip, manifest record). Validates before anything is fetched."""
    from ._compat import import_open_clip

    oc = import_open_clip()
    if model not in oc.list_models():
        raise ConfigError(f"unknown open_clip model {model!r}; see `python -c 'import open_clip; print(open_clip.list_models())'`")
    tags = oc.list_pretrained_tags_by_model(model)
    if pretrained.lower() == "none":
        # random weights are seeded, so every run (a resumed one too) gets the same model
        return None, {"pretrained": "none", "init_seed": RANDOM_INIT_SEED}
    if pretrained == "auto":
        laion = [t for t in tags if t.startswith("laion")]
        # the best-known LAION tag first (laion2b_s34b_b79k for ViT-B-32)
        preferred = sorted(laion, key=lambda t: (not t.startswith("laion2b_s"), t)) or list(tags)
        if not preferred:
            raise ConfigError(f"model {model!r} has no pretrained tag; pass --pretrained FILE or --pretrained none")
        pretrained = preferred[0]
    path = Path(pretrained).expanduser()
    if path.suffix in WEIGHT_SUFFIXES or os.sep in pretrained:
        if not path.is_file():
            raise ConfigError(f"weights file {pretrained} does not exist")
        return str(path), {"pretrained": str(path.resolve()), "weights_sha256": _sha256(path)}
    if pretrained not in tags:
        raise ConfigError(f"{pretrained!r} is neither a weights file nor a pretrained tag of {model}; tags: {', '.join(tags) or 'none'}")
    return pretrained, {"pretrained": pretrained}


@dataclass
class Encoder:
    model: object
    tokenizer: object
    preprocess: object
    device: str
    image_size: int
    info: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    def encode_images(self, batch) -> np.ndarray:
        """[b, 3, H, W] tensor -> [b, dim] float32, unit rows."""
        import torch

        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True)
            if self.device == "cuda":
                x = x.half()
            f = self.model.encode_image(x).float()
            f = torch.nn.functional.normalize(f, dim=-1)
        return f.cpu().numpy()

    def encode_text(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            tokens = self.tokenizer(texts).to(self.device)
            f = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return f.cpu().numpy()


def reparameterize(model) -> bool:
    """Fold train-time branches into single convolutions for inference, in place, as
    open_clip's MobileCLIP instructions ask: MobileOne and FastViT blocks (MobileCLIP,
    MobileCLIP2) train with parallel conv + BN branches that sum to one conv. Same
    embeddings to float noise (3e-8 on a CPU); 1.5x faster there
    (benchmarks/RESULTS.md). On CUDA the model is already half precision and folds in
    it: the folding's rounding is of the order of fp16 inference's own (unmeasured here,
    no GPU). -> whether the model had anything to fold."""
    if not any(hasattr(m, a) for m in model.modules() for a in ("reparameterize", "switch_to_deploy")):
        return False
    from timm.utils.model import reparameterize_model  # timm loads after _compat's torchvision shim

    reparameterize_model(model, inplace=True)
    return True


def hub_unreachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub, where pretrained tags come from, cannot be reached;
    huggingface_hub is then put in offline mode, so weights already in its cache still
    load and others fail at once. Without this, a machine with no network waits about a
    minute while the hub library retries and logs each try. With a proxy set, the proxy
    is what is probed (a direct connection says nothing then); none when offline mode is
    already on."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    if constants.HF_HUB_OFFLINE:
        return False
    hub = urllib.parse.urlparse(constants.ENDPOINT)
    hub_host = hub.hostname or "huggingface.co"
    proxies = urllib.request.getproxies()  # the *_proxy variables, as requests reads them
    proxy = None if urllib.request.proxy_bypass(hub_host) else (proxies.get(hub.scheme or "https") or proxies.get("all"))
    if proxy is not None:
        url = urllib.parse.urlparse(proxy if "://" in proxy else f"http://{proxy}")
        try:
            host, port = url.hostname, url.port or {"https": 443, "socks5": 1080, "socks5h": 1080, "socks4": 1080}.get(url.scheme, 80)
        except ValueError:  # a port that is not a number: let the hub library say what is wrong
            return False
    else:
        host, port = hub_host, hub.port or 443
    if not host:
        return False
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return False
    except OSError:
        constants.HF_HUB_OFFLINE = True
        log.info("cannot reach %s%s: the Hugging Face hub is used offline (cached weights only)",
                 "the proxy " if proxy else "", f"{host}:{port}")
        return True


def create_encoder(cfg: EncoderCfg) -> Encoder:
    """Build the open_clip model. Weights that cannot be fetched give a one-line
    EncoderError that says how to pass a local file."""
    import torch

    from ._compat import import_open_clip

    oc = import_open_clip()
    model_name = register_model_config(cfg.model)
    device = resolve_device(cfg.device)
    weights, record = resolve_weights(model_name, cfg.pretrained)
    offline = weights is not None and "weights_sha256" not in record and hub_unreachable()  # a tag, to be fetched
    try:
        if weights is None:
            torch.manual_seed(RANDOM_INIT_SEED)
        model, _, preprocess = oc.create_model_and_transforms(
            model_name, pretrained=weights, device=device, precision="fp16" if device == "cuda" else "fp32"
        )
    except (RuntimeError, OSError) as e:
        if offline or any(w in str(e).lower() for w in ("download", "offline", "connect", "cannot find the requested")):
            raise EncoderError(
                f"could not fetch weights {weights!r} for {model_name} (no network?); on a machine without internet "
                f"download open_clip_pytorch_model.bin elsewhere and pass --pretrained /path/to/it"
            ) from e
        raise EncoderError(f"could not create {model_name} with weights {weights!r}: {_one_line(e)}") from e
    except Exception as e:  # a damaged, empty or foreign weights file: pickle, safetensors, EOF, key errors
        raise EncoderError(f"could not load weights {weights!r} into {model_name}: {type(e).__name__}: {_one_line(e)}") from e
    model.eval()
    fused = reparameterize(model)
    pcfg = model.visual.preprocess_cfg
    size = pcfg["size"]
    image_size = int(max(size) if isinstance(size, (tuple, list)) else size)
    with torch.inference_mode():
        probe = torch.zeros(1, 3, image_size, image_size, device=device, dtype=torch.float16 if device == "cuda" else None)
        dim = int(model.encode_image(probe).shape[-1])
    info = {
        "kind": "open_clip",
        "model": model_name,
        **({"model_config": str(Path(cfg.model).resolve()), "config_sha256": config_sha256(Path(cfg.model))}
           if cfg.model.endswith(".json") else {}),
        **record,
        "dim": dim,
        **({"reparameterized": True} if fused else {}),
        "preprocess": {k: (list(v) if isinstance(v, tuple) else v) for k, v in pcfg.items()},
    }
    return Encoder(model, oc.get_tokenizer(model_name), preprocess, device, image_size, info)


def library_versions() -> dict:
    """Versions of what produced the vectors, for the manifest."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("novelty", "torch", "open_clip_torch", "faiss-cpu", "faiss-gpu-cu12", "numpy", "pillow"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out
