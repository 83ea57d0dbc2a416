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
2. Its first such call (per MCDropout context) runs as usual, and its output is the
   one returned; it is also compared with what sharing would give. The module is
   never shared if it writes into its inputs, returns them or a view of them, or if
   its output on the first pass's rows, repeated, differs from the whole output in
   structure, shape or value (beyond rounding): a leading dim that is not the batch
   (a GRU's h_n, sequence-first tensors), or rows that depend on each other.
3. After that check it runs on the first pass's B rows only, and its output (a tensor,
   or a tuple, list or dict of tensors with B rows) is repeated U times, each tensor
   with the same order of dims in memory.
4. Its output on those B rows is kept for the batch (keyed by the module, its call
   number in the forward and the images; reused only when the tensor inputs are equal
   and the other arguments too), so when the passes of one batch are split over
   several forwards (the CPU cap on rows per forward, or after running out of memory),
   a later forward reuses it instead of recomputing. A module whose input differs
   between forwards (dropout acted upstream) is not kept again in that batch.

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
    out: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, dropout_types) or not any(True for _ in child.parameters()):
                continue
            if any(isinstance(m, dropout_types) for m in child.modules()):  # a dropout shared under two names too
                walk(name, child)
            else:
                out.append((name, child))

    walk("", model)
    seen: set[int] = set()
    return [(n, m) for n, m in out if not (id(m) in seen or seen.add(id(m)))]


def _repeat(t: torch.Tensor, U: int) -> torch.Tensor:
    """[B, ...] -> [U*B, ...], pass-major, dense, with t's order of dims in memory
    (contiguous, channels_last, or a permuted layout that later code may .view)."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))  # outermost in memory first (stable)
    shape = (U * t.shape[0], *t.shape[1:])
    out = torch.empty([shape[d] for d in order], dtype=t.dtype, device=t.device).permute(
        *sorted(range(t.dim()), key=order.__getitem__))
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
        self.memo: dict = {}  # (module index, call number, first image, B) -> (inputs, other args, output), B rows
        self.varies: set[int] = set()  # modules whose input differed between forwards of this batch
        self.pure: set[int] = set()  # checked: neither writes into nor returns its inputs
        self.expands: set[int] = set()  # checked: once per image, repeated, equals every pass
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

    def _checked(self, k: int, expand: bool) -> bool:
        return k in self.pure and (not expand or k in self.expands)

    def _check(self, k: int, forward, args, kwargs, small, U: int, B: int):
        """A module's first shared call: run it as usual (its output is returned, so this
        call is exact whatever happens) and check that sharing it would give the same:
        it must not write into its inputs nor return them (or views of them), and with
        U > 1 its output on the first pass's rows, repeated, must equal the whole
        output (same structure, shapes and values up to rounding; this catches a
        leading dim that is not the batch, or rows that depend on each other)."""
        s_args, s_kwargs, tensors = small
        before = [t.clone() for t in tensors]
        out = forward(*args, **kwargs)
        name = self.modules[k][0]
        if not all(torch.equal(a, t) for a, t in zip(before, tensors)):
            return self._refuse(k, name, "writes into its input", out)
        if _aliases(out, [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]):
            return self._refuse(k, name, "returns its input or a view of it", out)
        self.pure.add(k)
        if U > 1:
            c_args, c_kwargs = _swap(s_args, s_kwargs, tensors, before)
            try:
                rep = _expand(forward(*c_args, **c_kwargs), U, B)
            except Exception as e:  # e.g. an argument that was not a batch, cut as if it were
                return self._refuse(k, name, f"fails on the first pass's rows alone ({type(e).__name__})", out)
            if rep is None or not _same(rep, out):
                return self._refuse(k, name, "gives another output when run once per image", out)
            self.expands.add(k)
        return out

    def _refuse(self, k: int, name: str, why: str, out):
        self.unshareable.add(k)
        log.info("trunk module %s %s; it runs on every pass", name or "<root>", why)
        self.stats["unshared"] += 1
        return out

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
            if not self._checked(k, U > 1):
                return self._check(k, forward, args, kwargs, small, U, B)
            key = (k, call, start, B)
            scalars = _scalars(s_args, s_kwargs)
            memo = self.memo.pop(key, None)
            hit = memo is not None and memo[1] == scalars and len(memo[0]) == len(tensors) and all(
                a.shape == b.shape and torch.equal(a, b) for a, b in zip(memo[0], tensors))
            if hit:
                self.stats["reused"] += 1
                out_small = memo[2]
                self.memo[key] = memo
            else:
                if memo is not None:
                    self.varies.add(k)  # its input changes between passes: dropout acts upstream
                out_small = forward(*s_args, **s_kwargs)
                if reuse and k not in self.varies:
                    self.memo[key] = ([t.clone() for t in tensors], scalars, out_small)
            # a fresh copy whenever the output is kept: code downstream may write into it
            out = _expand(out_small, U, B) if U > 1 or key in self.memo else out_small
            if out is None:  # U == 1 and an output of no copyable form (a list of dicts): not kept
                self.memo.pop(key, None)
                self.unshareable.add(k)
                return forward(*args, **kwargs) if hit else out_small
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


def _scalars(s_args, s_kwargs) -> tuple:
    """The non-tensor arguments, for the memo's key."""
    return (tuple(a for a in s_args if not isinstance(a, torch.Tensor)),
            tuple((n, v) for n, v in s_kwargs.items() if not isinstance(v, torch.Tensor)))


def _swap(s_args, s_kwargs, tensors, copies):
    """The first-pass arguments with each tensor replaced by its copy."""
    by_id = {id(t): c for t, c in zip(tensors, copies)}
    return (tuple(by_id.get(id(a), a) for a in s_args), {n: by_id.get(id(v), v) for n, v in s_kwargs.items()})


def _leaves(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _leaves(o)]
    if isinstance(out, Mapping):
        return [t for o in out.values() for t in _leaves(o)]
    return []


def _aliases(out, inputs: list) -> bool:
    """Does any tensor of `out` share memory with an input?"""
    ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    return any(t.untyped_storage().data_ptr() in ptrs for t in _leaves(out))


def _same(a, b) -> bool:
    """Same structure, shapes and values up to float rounding."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)))
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and list(a) == list(b) and all(_same(a[n], b[n]) for n in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return False


class _NotShared(Exception):
    pass
