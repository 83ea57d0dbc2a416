"""Opt-in dropout for models trained without it (``--inject-dropout P``).

Which layers. A *layer* is an nn.Linear or nn.Conv1d/2d/3d. ``inject_dropout`` puts
``nn.Dropout(p)`` (element-wise) on the input of the model's head layers, found by
attribute name (the last part of the module's dotted name), in this order:

1. every layer whose own name is in ``names``;
2. for every other module whose name is in ``names`` (a head container), its last
   layer in registration order, i.e. the layer that usually produces the output;
3. if 1 and 2 find nothing: the last layer of the whole model, with a warning naming it.

The default ``names`` (``HEAD_NAMES``) cover torchvision's detectors and segmenters
and the usual classifier heads: ``cls_score``/``bbox_pred`` (Faster/Mask R-CNN box
predictor), ``cls_logits``/``bbox_reg`` (RetinaNet, FCOS, RPN), ``box_predictor``,
``classifier`` (DeepLab, FCN, LR-ASPP), ``head``, ``fc``, ``predictor``. Names are
matched exactly, so ``roi_heads`` is not ``heads``. Pass ``names`` to choose others.
A model with no Linear or Conv layer is left unchanged, with a warning.

How. The dropout is registered as a child ``mc_dropout`` of the layer and applied by
a forward pre-hook: parameter names and the state dict do not change, the model
behaves the same in eval mode, and injecting twice only updates ``p``.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from ..errors import ConfigError

log = logging.getLogger(__name__)

HEAD_NAMES = ("cls_score", "bbox_pred", "cls_logits", "bbox_reg", "box_predictor", "classifier", "head", "fc",
              "predictor")
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _dropout_input(module: nn.Module, args):
    if args and hasattr(args[0], "dim"):
        return (module.mc_dropout(args[0]), *args[1:])
    return None


def head_layers(model: nn.Module, names: Sequence[str] = HEAD_NAMES) -> tuple[list[str], bool]:
    """Dotted names of the layers rule 1-3 picks, and whether it fell back to rule 3."""
    layers = [n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    picked: list[str] = []
    for qn, m in model.named_modules():
        if not qn or qn.rsplit(".", 1)[-1] not in names:
            continue
        if isinstance(m, LAYER_TYPES):
            picked.append(qn)
        else:
            inner = [n for n in layers if n.startswith(qn + ".")]
            if inner:
                picked.append(inner[-1])
    picked = list(dict.fromkeys(picked))
    if picked or not layers:
        return picked, False
    return [layers[-1]], True


def inject_dropout(model: nn.Module, p: float, names: Sequence[str] = HEAD_NAMES) -> list[str]:
    """Dropout(p) before the model's head layers (module docstring). -> their names."""
    if not 0.0 < p < 1.0:
        raise ConfigError(f"inject-dropout p must be in (0, 1), got {p}")
    picked, fallback = head_layers(model, names)
    if not picked:
        log.warning("inject_dropout changed nothing: the model has no Linear or Conv layer")
        return []
    if fallback:
        log.warning("inject_dropout: no module named %s; using the model's last layer %s",
                    "/".join(names), picked[0])
    mods = dict(model.named_modules())
    for qn in picked:
        layer = mods[qn]
        if isinstance(getattr(layer, "mc_dropout", None), nn.Dropout):
            layer.mc_dropout.p = p
            continue
        layer.mc_dropout = nn.Dropout(p)
        layer.register_forward_pre_hook(_dropout_input)
    log.info("inject_dropout: Dropout(%g) before %s", p, ", ".join(picked))
    return picked
