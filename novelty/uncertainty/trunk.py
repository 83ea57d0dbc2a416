"""Run the parts of a model that no dropout layer touches once per image, not once per pass.

MC dropout repeats each image T times along the batch dim (mc.py), so everything
upstream of the first dropout layer (a detector's backbone, a U-Net's encoder) would
compute the same rows T times. A *trunk module* is a largest sub-module that has
parameters and no dropout layer inside it. While a forward of ``U`` passes x ``B``
images is in flight, each trunk module's ``forward`` is wrapped:

1. Its inputs are checked: every tensor argument must have the forward's U*B rows and
   be the same in every pass (``torch.equal`` of each pass's B rows against the first
   pass's); other arguments may only be None, numbers or strings. Otherwise (a row
   differs because dropout acted upstream, a list of images, an ImageList, ...) the
   module runs as usual.
2. It then runs on the first pass's B rows only, and its output (a tensor, or a
   tuple, list or dict of tensors with B rows) is repeated U times, in the same memory
   format. An output that is not of that form is computed again on all rows, and the
   module is not shared again.
3. Its output on those B rows is kept for the batch (keyed by the module, its call
   number in the forward and the images), so when the passes of one batch are split
   over several forwards (the CPU cap on rows per forward, or after running out of
   memory), a later forward whose inputs are equal to the kept ones reuses it instead
   of recomputing. A module whose input differs between forwards (dropout acted
   upstream) or that writes into its input is not kept again in that batch.
4. A module that changed its input in place has the change copied to the other passes'
   rows, as the unshared forward would have made it.

This is exact under the assumption the batched passes already make: in eval mode, a
module's output for one image does not depend on the other images of the batch. Up to
float rounding (kernels may round differently with the batch size), the scores equal
those of the unshared forward; ``MCDropout(share_trunk=False)`` turns it off.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

_SCALARS = (type(None), bool, int, float, str)


def trunk_modules(model: nn.Module, dropout_types: tuple) -> list[tuple[str, nn.Module]]:
    """The largest sub-modules with parameters and no dropout layer inside, in
    ``named_modules`` order (the root itself never: it has the dropout layers)."""
    drop = [name for name, m in model.named_modules() if isinstance(m, dropout_types)]
    out: list[tuple[str, nn.Module]] = []

    def holds_dropout(name: str) -> bool:
        return any(d == name or d.startswith(name + ".") for d in drop)

    def walk(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, dropout_types) or not any(True for _ in child.parameters()):
                continue
            if holds_dropout(name):
                walk(name, child)
            else:
                out.append((name, child))

    walk("", model)
    seen: set[int] = set()
    return [(n, m) for n, m in out if not (id(m) in seen or seen.add(id(m)))]


def _format(t: torch.Tensor):
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _repeat(t: torch.Tensor, U: int) -> torch.Tensor:
    """[B, ...] -> [U*B, ...], pass-major, in t's memory format."""
    out = torch.empty((U * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device, memory_format=_format(t))
    out.unflatten(0, (U, t.shape[0])).copy_(t.unsqueeze(0).expand(U, *t.shape))
    return out


def _expand(out, U: int, B: int):
    """A module's output on B rows -> the same for U*B rows, or None when it is not a
    tensor (or a tuple, list or dict of tensors) with B rows."""
    def ok(t):
        return isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == B

    if ok(out):
        return _repeat(out, U)
    if isinstance(out, (tuple, list)) and out and all(ok(t) for t in out):
        items = [_repeat(t, U) for t in out]
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
    if isinstance(out, Mapping) and out and all(ok(t) for t in out.values()):
        try:
            return type(out)((k, _repeat(t, U)) for k, t in out.items())
        except TypeError:
            return None
    return None


class TrunkSharing:
    """Wraps the trunk modules' ``forward`` while installed (module docstring). ``chunk``
    is a callable giving the forward in flight, or None: (passes, images, first image,
    whether a later forward of this batch runs the same images)."""

    def __init__(self, model: nn.Module, dropout_types: tuple, chunk):
        self.modules = trunk_modules(model, dropout_types)
        self.chunk = chunk
        self.unshareable: set[int] = set()
        self.memo: dict = {}  # (module index, call number, first image, B) -> (inputs, output), on B rows
        self.varies: set[int] = set()  # modules not to reuse in this batch: input differed, or written in place
        self.calls: dict[int, int] = {}
        self.stats = {"shared": 0, "reused": 0, "unshared": 0}
        self._saved: list = []

    def install(self) -> None:
        for k, (name, m) in enumerate(self.modules):
            had, own = "forward" in m.__dict__, m.__dict__.get("forward")
            try:
                m.forward = self._wrap(k, m, m.forward)
            except (AttributeError, RuntimeError, TypeError) as e:
                log.info("trunk module %s is not shared (%s)", name, e)
                continue
            self._saved.append((m, had, own))

    def remove(self) -> None:
        for m, had, fwd in self._saved:
            if had:
                m.forward = fwd
            else:
                del m.forward
        self._saved = []
        self.new_batch()

    def new_forward(self) -> None:
        self.calls.clear()

    def new_batch(self) -> None:
        self.memo.clear()
        self.varies.clear()
        self.calls.clear()

    def _wrap(self, k: int, module: nn.Module, forward):
        def shared_forward(*args, **kwargs):
            chunk = self.chunk()
            if chunk is None or k in self.unshareable:
                return forward(*args, **kwargs)
            (ts, B, start, reuse) = chunk
            U = len(ts)
            if U == 1 and not reuse:
                return forward(*args, **kwargs)
            call = self.calls[k] = self.calls.get(k, 0) + 1
            small = _first_pass(args, kwargs, U, B)
            if small is None:
                self.stats["unshared"] += 1
                return forward(*args, **kwargs)
            s_args, s_kwargs, tensors = small
            key = (k, call, start, B)
            memo = self.memo.pop(key, None)
            if memo is not None and len(memo[0]) == len(tensors) and all(
                    a.shape == b.shape and torch.equal(a, b) for a, b in zip(memo[0], tensors)):
                self.stats["reused"] += 1
                out_small = memo[1]
                self.memo[key] = memo
            else:
                if memo is not None:
                    self.varies.add(k)  # its input changes between passes: dropout acts upstream
                keep = reuse and k not in self.varies
                before = [t.clone() for t in tensors] if keep else None
                out_small = forward(*s_args, **s_kwargs)
                _propagate_in_place(args, kwargs, U, B)
                if keep and all(torch.equal(a, t) for a, t in zip(before, tensors)):
                    self.memo[key] = (before, out_small)
                elif keep:
                    self.varies.add(k)  # it writes into its input: reusing its output would skip that
            # a fresh copy whenever the output is kept: code downstream may write into it
            out = _expand(out_small, U, B) if U > 1 or key in self.memo else out_small
            if out is None:
                self.unshareable.add(k)
                self.memo.pop(key, None)
                log.info("trunk module %s returns %s, which cannot be repeated per pass; it runs on every pass",
                         self.modules[k][0] or "<root>", type(out_small).__name__)
                return forward(*args, **kwargs)
            self.stats["shared"] += 1
            return out

        return shared_forward


def _first_pass(args, kwargs, U: int, B: int):
    """(args, kwargs) cut to the first pass's B rows, and those tensors; None unless every
    tensor argument has U*B rows equal across the U passes and the rest are scalars."""
    tensors = []

    def cut(v):
        if isinstance(v, torch.Tensor):
            if v.dim() == 0 or v.shape[0] != U * B:
                raise _NotShared
            rows = v.unflatten(0, (U, B))
            first = rows[0]
            for u in range(1, U):
                if not torch.equal(rows[u], first):
                    raise _NotShared
            tensors.append(first)
            return first
        if isinstance(v, _SCALARS):
            return v
        raise _NotShared

    try:
        s_args = tuple(cut(a) for a in args)
        s_kwargs = {n: cut(v) for n, v in kwargs.items()}
    except _NotShared:
        return None
    if not tensors:
        return None
    return s_args, s_kwargs, tensors


def _propagate_in_place(args, kwargs, U: int, B: int) -> None:
    """A module that wrote into its (first-pass) input: give the other passes' rows the same
    values, as running it on all rows would have."""
    if U < 2:
        return
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            rows = v.unflatten(0, (U, B))
            if not torch.equal(rows[1], rows[0]):
                rows[1:].copy_(rows[0].unsqueeze(0).expand(U - 1, *rows.shape[1:]))


class _NotShared(Exception):
    pass
