"""MC-dropout sampling, dropout injection, model specs and the runner, on tiny CPU models."""
from __future__ import annotations

import copy
import logging
import pickle
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from novelty.errors import ConfigError, ModelError
from novelty.uncertainty import (
    MCDropout,
    UncertaintyCfg,
    default_preprocess,
    find_dropout,
    head_layers,
    inject_dropout,
    load_model_spec,
    mc_forward,
    score_batches,
)
from tests._tiny_models import (
    TinyDetector,
    TinySegmenter,
    blocky_noise,
    make_plain_cnn,
    make_scenes,
    train_detector,
    train_segmenter,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # two threads on a busy 2-core machine make tiny convolutions 10x slower, not faster
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def detector() -> TinyDetector:
    return train_detector(TinyDetector(), seed=0)


@pytest.fixture(scope="module")
def segmenter() -> TinySegmenter:
    return train_segmenter(TinySegmenter(), seed=0)


@pytest.fixture(scope="module")
def scenes() -> torch.Tensor:
    return make_scenes(8, seed=100)[0]


def scores(model, images, batch: int | None = None, **cfg) -> np.ndarray:
    kw = dict(kind="detection", passes=8, device="cpu")
    kw.update(cfg)
    batch = batch or images.shape[0]
    batches = [(list(range(i, min(i + batch, len(images)))), images[i:i + batch]) for i in range(0, len(images), batch)]
    out = list(score_batches(model, batches, UncertaintyCfg(**kw)))
    assert [r.key for r in out] == list(range(len(images))) and all(r.error is None for r in out)
    return np.array([r.score for r in out])


def auc(lo: np.ndarray, hi: np.ndarray) -> float:
    """Share of (lo, hi) pairs ranked hi > lo."""
    return float((hi[None, :] > lo[:, None]).mean())


# -- sampling ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["detection", "segmentation"])
def test_no_disagreement_with_dropout_off(kind, detector, segmenter, scenes):
    model = copy.deepcopy(detector if kind == "detection" else segmenter)
    for _, m in find_dropout(model):
        m.p = 0.0
    s = scores(model, scenes, kind=kind)
    np.testing.assert_allclose(s, 0.0, atol=1e-5)
    assert scores(detector if kind == "detection" else segmenter, scenes, kind=kind).max() > 0  # and on


@pytest.mark.parametrize("kind", ["detection", "segmentation"])
def test_same_seed_same_scores_whatever_the_batching(kind, detector, segmenter, scenes):
    model = detector if kind == "detection" else segmenter
    ref = scores(model, scenes, kind=kind, seed=3)
    np.testing.assert_array_equal(scores(model, scenes, kind=kind, seed=3), ref)
    np.testing.assert_allclose(scores(model, scenes, batch=3, kind=kind, seed=3), ref, atol=1e-4)
    np.testing.assert_allclose(scores(model, scenes, kind=kind, seed=3, max_batch=5), ref, atol=1e-4)
    assert not np.allclose(scores(model, scenes, kind=kind, seed=4), ref)


def test_batchnorm_stats_and_modes_unchanged(detector, scenes):
    model = copy.deepcopy(detector).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores(model, scenes)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats, num_batches_tracked
    assert all(m.training for m in model.modules())  # train flags restored


def test_batched_forward_runs_once_and_equals_the_loop(detector, scenes):
    calls = []
    handle = detector.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        T, B = 6, scenes.shape[0]
        out = {}
        for max_batch in (None, B, 1):
            calls.clear()
            out[max_batch] = mc_forward(detector, scenes, T, seed=1, max_batch=max_batch)
            out[max_batch, "calls"] = list(calls)
    finally:
        handle.remove()
    assert out[None, "calls"] == [T * B]  # one forward of [T*B, ...]
    assert out[B, "calls"] == [B] * T  # T forwards of the batch
    assert out[1, "calls"] == [1] * (T * B)
    for b in range(B):
        for t in range(T):
            for mb in (B, 1):  # same masks, so the same outputs up to float rounding
                torch.testing.assert_close(out[mb][b][t]["scores"], out[None][b][t]["scores"], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out[None][0][0]["scores"], out[None][0][1]["scores"])  # passes differ


def test_masks_have_dropout_statistics():
    torch.manual_seed(0)
    x = torch.ones(4, 256, 4, 4)
    for layer, per_channel in ((nn.Dropout(0.25), False), (nn.Dropout2d(0.25), True)):
        with MCDropout(layer, seed=0) as mc:
            y = mc.sample(x, 5)  # [20, 256, 4, 4]
        assert torch.unique(y).tolist() == pytest.approx([0.0, 1 / 0.75])
        assert (y == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
        if per_channel:
            assert torch.all(y.amax((2, 3)) == y.amin((2, 3)))  # whole channels dropped
        torch.testing.assert_close(y[:4], y[:1].expand(4, -1, -1, -1))  # one mask per pass
    alpha = nn.AlphaDropout(0.2)
    with MCDropout(alpha, seed=0) as mc:
        ours = set(np.round(torch.unique(mc.sample(torch.zeros(2, 1000), 3)).numpy(), 5))
    torch_vals = set(np.round(torch.unique(alpha.train()(torch.zeros(2, 1000))).numpy(), 5))
    assert ours == torch_vals  # the same affine correction as ATen's alpha dropout


def test_per_call_masks_when_rows_are_not_the_batch():
    class PerCell(nn.Module):  # dropout on [B*64, w]: the leading dim is not T*B
        def __init__(self):
            super().__init__()
            self.conv, self.drop, self.out = nn.Conv2d(3, 4, 4, stride=4), nn.Dropout(0.5), nn.Linear(4, 2)

        def forward(self, x):
            f = self.conv(x).flatten(2).transpose(1, 2)  # [B, 64, 4]
            return self.out(self.drop(f.reshape(-1, 4))).reshape(x.shape[0], -1)  # [B, 128]

    torch.manual_seed(0)
    model, x = PerCell(), torch.rand(3, 3, 32, 32)
    a = mc_forward(model, x, 4, seed=2)
    b = mc_forward(model, x, 4, seed=2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.allclose(a[0][0], a[0][1])


def test_out_of_memory_halves_the_rows():
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.drop = nn.Conv2d(3, 2, 1), nn.Dropout(0.5)

        def forward(self, x):
            if x.shape[0] > 8:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.drop(self.conv(x))

    torch.manual_seed(0)
    model, x = Picky(), torch.rand(4, 3, 8, 8)
    ref = mc_forward(model, x, 6, max_batch=4)
    with MCDropout(model) as mc:
        got = mc.sample(x, 6)
        assert mc.oom_rows <= 8
    assert torch.equal(got.reshape(6, 4, 2, 8, 8).transpose(0, 1), torch.stack(ref))


# -- the shared trunk --------------------------------------------------------------------
class SkipNet(nn.Module):
    """U-Net-like: the encoder's output is used both through the dropout and around it;
    `tail` takes a list (not shared), `twice` modifies its input in place, `listy`
    returns a list of dicts (cannot be repeated per pass)."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            x.mul_(self.scale)  # in place, on purpose
            return x + 1

    class Listy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return [{"v": v} for v in self.lin(x.mean((2, 3)))]

    class Tail(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, parts):
            return self.lin(torch.stack(parts))

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.twice, self.listy, self.tail = self.Twice(), self.Listy(), self.Tail()
        self.drop = nn.Dropout2d(0.5)
        self.dec = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        e = self.enc(x)
        t = self.twice(e)  # e is now doubled in place as well
        extra = torch.stack([d["v"] for d in self.listy(t)])  # [N, 4]
        y = self.dec(torch.cat([self.drop(t), e], 1))  # skip connection around the dropout
        return y + self.tail(list(extra))[:, :3, None, None]


def test_trunk_modules_are_the_largest_dropout_free_parts(detector):
    from novelty.uncertainty.mc import DROPOUT_TYPES
    from novelty.uncertainty.trunk import trunk_modules

    assert [n for n, _ in trunk_modules(detector, DROPOUT_TYPES)] == ["backbone", "head"]
    assert [n for n, _ in trunk_modules(SkipNet(), DROPOUT_TYPES)] == ["enc", "twice", "listy", "tail", "dec"]


@pytest.mark.parametrize("max_batch", [None, 8, 3])
def test_shared_trunk_equals_the_whole_model_per_pass(max_batch):
    torch.manual_seed(0)
    model, x, T = SkipNet().eval(), torch.rand(4, 3, 8, 8), 5
    conv_rows = []
    h = model.enc[0].register_forward_hook(lambda m, a, o: conv_rows.append(a[0].shape[0]))
    try:
        with MCDropout(model, seed=1, max_batch=max_batch, share_trunk=False) as mc:
            ref = mc.sample(x, T)
        unshared = sum(conv_rows)
        with MCDropout(model, seed=1, max_batch=max_batch) as mc:
            first = mc.sample(x, T)  # the first call of each trunk module is checked against the unshared one
            conv_rows.clear()
            got = mc.sample(x, T)
            stats = dict(mc.trunk.stats)
    finally:
        h.remove()
    assert unshared == T * 4
    assert sum(conv_rows) == 4  # once per image, also when the passes are split over forwards
    torch.testing.assert_close(first, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got[:4], got[4:8])  # the passes still differ
    assert stats["shared"] > 0 and stats["unshared"] > 0  # enc shared; dec (after the dropout) and tail (a list) not
    assert not any("forward" in m.__dict__ for m in model.modules())  # wrappers removed on exit


class GruHead(nn.Module):
    """h_n of a batch-first GRU is [layers, N, H]: its leading dim is not the batch."""

    def __init__(self):
        super().__init__()
        self.cnn, self.rnn = nn.Conv2d(3, 4, 3, padding=1), nn.GRU(20, 6, batch_first=True)
        self.drop, self.head = nn.Dropout(0.5), nn.Linear(6, 2)

    def forward(self, x):
        _, h = self.rnn(self.cnn(x).flatten(1, 2).transpose(1, 2))
        return self.head(self.drop(h[-1]))


class SharedDrop(nn.Module):
    """One dropout instance under two names: the child holding it is not a trunk."""

    class Block(nn.Module):
        def __init__(self, drop):
            super().__init__()
            self.lin, self.drop = nn.Linear(8, 8), drop

        def forward(self, x):
            return self.drop(self.lin(x))

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.block, self.head = self.Block(self.drop), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.block(x.flatten(1)[:, :8]))


class Permuted(nn.Module):
    """A trunk returning a permuted view, which later code must be able to .view."""

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x).permute(0, 2, 3, 1)

    def __init__(self):
        super().__init__()
        self.enc, self.drop, self.head = self.Enc(), nn.Dropout(0.5), nn.Linear(4 * 5 * 7, 2)

    def forward(self, x):
        f = self.enc(x).permute(0, 3, 1, 2)
        return self.head(self.drop(f.view(f.shape[0], -1)))


class Aliasing(nn.Module):
    """A trunk that returns its input; a later in-place op must reach the skip path."""

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return x

    def __init__(self):
        super().__init__()
        self.stem, self.gate = nn.Conv2d(3, 4, 3, padding=1), self.Gate()
        self.drop, self.head = nn.Dropout2d(0.5), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        f = self.stem(x)
        g = torch.relu_(self.gate(f))  # f is g: the skip connection sees the ReLU too
        return self.head(torch.cat([self.drop(g), f], 1))


class SquareMask(nn.Module):
    """An [L, L] argument whose L happens to be T*B: cut as a batch, the module fails."""

    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, mask):
            return self.lin(x) + mask.sum()

    def __init__(self):
        super().__init__()
        self.mix, self.drop, self.head = self.Mix(), nn.Dropout(0.5), nn.Linear(4, 2)

    def forward(self, x):
        v = x.flatten(1)[:, :4]
        return self.head(self.drop(self.mix(v, torch.ones(len(v), len(v)))))


@pytest.mark.parametrize("make", [GruHead, SharedDrop, Permuted, Aliasing, SquareMask])
@pytest.mark.parametrize("B", [1, 2])
def test_trunk_sharing_refuses_what_it_cannot_share(make, B):
    # found in review: each of these gave other outputs (or crashed) with sharing on
    torch.manual_seed(0)
    model, x = make().eval(), torch.rand(B, 3, 5, 7)
    for max_batch in (None, 1):
        with MCDropout(model, 1, max_batch, share_trunk=False) as mc:
            ref = mc.sample(x, 3)
        with MCDropout(model, 1, max_batch) as mc:
            for _ in range(2):  # the checked call, then the shared one
                torch.testing.assert_close(mc.sample(x, 3), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_scripted_trunk_is_shared_and_restored():
    torch.manual_seed(0)
    body = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()))
    own = body.__dict__.get("forward")
    model, x = nn.Sequential(body, nn.Dropout2d(0.5), nn.Conv2d(4, 2, 1)).eval(), torch.rand(2, 3, 8, 8)
    with MCDropout(model, 0, share_trunk=False) as mc:
        ref = mc.sample(x, 4)
    with MCDropout(model, 0) as mc:
        torch.testing.assert_close(mc.sample(x, 4), ref)  # checked
        torch.testing.assert_close(mc.sample(x, 4), ref)  # shared
        assert mc.trunk.stats["shared"] == 1
    assert body.__dict__.get("forward") is own  # TorchScript's own forward is back


def test_trunk_sharing_speeds_up_scores_and_keeps_them(detector, scenes):
    ref = scores(detector, scenes, share_trunk=False, seed=2)
    for mb in (None, 8, 1):
        np.testing.assert_allclose(scores(detector, scenes, share_trunk=True, seed=2, max_batch=mb), ref, atol=1e-5)


# -- out of distribution -----------------------------------------------------------------
def test_noise_scores_higher_than_scenes(detector, segmenter):
    ind = make_scenes(24, seed=200)[0]
    ood = blocky_noise(24, seed=7)
    for kind, model, margin in (("detection", detector, 0.3), ("segmentation", segmenter, 0.2)):
        s_in, s_out = scores(model, ind, kind=kind, passes=10), scores(model, ood, kind=kind, passes=10)
        assert s_out.mean() > s_in.mean() + margin, (kind, s_in.mean(), s_out.mean())
        assert auc(s_in, s_out) >= 0.9, kind


# -- dropout injection -------------------------------------------------------------------
def test_model_without_dropout_is_refused_until_injected():
    model = make_plain_cnn()
    with pytest.raises(ModelError, match="inject-dropout"):
        MCDropout(model)
    assert inject_dropout(model, 0.3) == ["3"]  # no head name: the last layer, with a warning
    x = torch.rand(2, 3, 16, 16)
    out = mc_forward(model, x, 4)
    assert not torch.allclose(out[0][0], out[0][1])
    model.eval()
    torch.testing.assert_close(model(x), model[3](model[2](model[1](model[0](x)))))  # eval: identity


def test_inject_rule(caplog):
    class Det(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
            self.head = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 1))  # container
            self.cls_score = nn.Linear(6, 3)  # named layer

    m = Det()
    keys = list(m.state_dict())
    assert head_layers(m) == (["head.2", "cls_score"], False)
    assert inject_dropout(m, 0.2) == ["head.2", "cls_score"]
    assert list(m.state_dict()) == keys  # parameter names unchanged
    inject_dropout(m, 0.4)  # idempotent: updates p
    assert [(n, d.p) for n, d in find_dropout(m)] == [("head.2.mc_dropout", 0.4), ("cls_score.mc_dropout", 0.4)]
    assert head_layers(m, names=("backbone",)) == (["backbone.0"], False)
    with caplog.at_level(logging.WARNING):
        assert inject_dropout(nn.Sequential(nn.ReLU()), 0.2) == []
    assert "changed nothing" in caplog.text
    with pytest.raises(ConfigError):
        inject_dropout(m, 1.5)


def test_runner_injects_dropout_when_asked():
    model = make_plain_cnn()
    with pytest.raises(ModelError):
        list(score_batches(model, [([0], torch.rand(1, 3, 8, 8))], UncertaintyCfg(kind="segmentation", device="cpu")))
    cfg = UncertaintyCfg(kind="segmentation", device="cpu", inject_dropout=0.3)
    (r,) = score_batches(model, [([0], torch.rand(1, 3, 8, 8))], cfg)
    assert r.score > 0


# -- runner ------------------------------------------------------------------------------
def test_failing_image_is_recorded_and_the_run_goes_on(detector, scenes):
    class Fragile(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if torch.isnan(x).flatten(1).any(1).any():
                raise ValueError("NaN pixels")
            return self.inner(x)

    bad = scenes.clone()
    bad[2, 0, 0, 0] = float("nan")
    ref = scores(detector, scenes)
    done = []
    cfg = UncertaintyCfg(kind="detection", passes=8, device="cpu")
    out = list(score_batches(Fragile(detector), [(list("abcd"), bad[:4]), (list("efgh"), bad[4:])], cfg, done.append))
    assert [r.key for r in out] == list("abcdefgh") and done == [4, 4]
    assert out[2].score is None and out[2].error == "ValueError: NaN pixels"
    np.testing.assert_allclose([r.score for i, r in enumerate(out) if i != 2], np.delete(ref, 2), atol=1e-4)


def test_broken_output_contract_stops_the_run(segmenter, scenes):
    with pytest.raises(ModelError, match="list of dicts"):
        list(score_batches(segmenter, [([0, 1], scenes[:2])], UncertaintyCfg(kind="detection", device="cpu")))


@pytest.mark.parametrize("kind", ["detection", "segmentation"])
@pytest.mark.parametrize("images, got", [
    (torch.rand(1, 32, 32), r"a tensor of shape \[32, 32\]"),  # T=3 passes of it would look like one RGB image
    (torch.rand(2, 32, 32), r"a tensor of shape \[32, 32\]"),
    ([torch.rand(32, 32), torch.rand(32, 24)], r"a tensor of shape \[32, 32\]"),
    ([torch.rand(3, 32, 32), np.zeros((3, 32, 32), np.float32)], "a ndarray"),
])
def test_preprocess_that_breaks_its_contract_stops_the_run(kind, images, got, detector, segmenter):
    model = detector if kind == "detection" else segmenter
    cfg = UncertaintyCfg(kind=kind, passes=3, device="cpu")
    with pytest.raises(ModelError, match=f"^the preprocess returned {got} for an image; it must return a float tensor"):
        list(score_batches(model, [(list(range(len(images))), images)], cfg))


def test_segmentation_takes_lists_and_dict_outputs(segmenter, scenes):
    class DictOut(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return {"out": self.inner(x), "aux": None}

    ref = scores(segmenter, scenes[:2], kind="segmentation")
    cfg = UncertaintyCfg(kind="segmentation", passes=8, device="cpu")
    got = [r.score for r in score_batches(DictOut(segmenter), [([0, 1], [scenes[0], scenes[1]])], cfg)]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    mixed = [scenes[0], torch.rand(3, 16, 24)]  # sizes differ: one image per forward
    assert len([r.score for r in score_batches(segmenter, [([0, 1], mixed)], cfg)]) == 2


def test_auto_rows_caps_cpu_forwards():
    from novelty.uncertainty import auto_rows

    cpu = torch.device("cpu")
    assert auto_rows(torch.zeros(8, 3, 320, 320), cpu) == 5
    assert auto_rows([torch.zeros(3, 32, 32), torch.zeros(3, 2000, 2000)], cpu) == 1
    assert auto_rows(torch.zeros(8, 3, 320, 320), torch.device("cuda")) is None  # no cap on a GPU


@pytest.mark.parametrize("kind", ["detection", "segmentation"])
def test_bf16_passes_round_the_scores_and_no_more(kind, detector, segmenter, scenes):
    model = detector if kind == "detection" else segmenter
    images = torch.cat([scenes, make_scenes(8, seed=101)[0]])
    fp32 = scores(model, images, kind=kind)
    bf16 = scores(model, images, kind=kind, precision="bf16")
    assert not np.array_equal(fp32, bf16)  # the passes really ran in bfloat16
    # bfloat16 keeps 8 significant bits: the scores move by rounding, the ranking barely
    np.testing.assert_allclose(bf16, fp32, atol=0.05 * float(np.abs(fp32).max()))
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(rank(fp32), rank(bf16))[0, 1] > 0.9


def test_fp16_needs_cuda(segmenter, scenes):
    with pytest.raises(ConfigError, match="fp16 runs on CUDA only"):
        scores(segmenter, scenes, kind="segmentation", precision="fp16")


def test_cfg_validation():
    with pytest.raises(ConfigError, match="fp32, bf16, fp16"):
        UncertaintyCfg(precision="fp8")
    for bad in (dict(kind="keypoints"), dict(passes=1), dict(seed=-1), dict(max_batch=0)):
        with pytest.raises(ConfigError):
            UncertaintyCfg(**bad)
    with pytest.raises(ConfigError, match="detection, segmentation"):
        UncertaintyCfg(kind="keypoints")


def test_cli_choices_are_the_runners():
    """The CLI spells its --precision and --kind choices out (importing the runner
    would load torch at start-up); they must stay the runner's."""
    from novelty import cli
    from novelty.uncertainty import runner

    assert [p.value for p in cli.Precision] == list(runner.PRECISIONS)
    assert [k.value for k in cli.Kind] == list(runner.KINDS)


# -- model specs -------------------------------------------------------------------------
def test_load_module_spec():
    model, pre = load_model_spec("tests._tiny_models:make_detector")
    assert isinstance(model, TinyDetector)
    from PIL import Image

    img = Image.new("RGB", (40, 30), (255, 0, 0))
    x = pre(img)
    assert x.shape == (3, 30, 40) and x.dtype == torch.float32 and x[0].max() == 1.0 and x[1].max() == 0.0
    assert default_preprocess(32)(img).shape == (3, 32, 32)
    assert default_preprocess((16, 24))(img).shape == (3, 16, 24)
    assert pickle.loads(pickle.dumps(default_preprocess(32)))(img).shape == (3, 32, 32)  # DataLoader workers
    model, pre = load_model_spec("tests._tiny_models:make_detector_with_preprocess")
    assert pre(img).shape == (3, 32, 32)


def test_load_file_spec(tmp_path):
    (tmp_path / "helper_layers.py").write_text("import torch\nWIDTH = 4\n")
    f = tmp_path / "my_det.py"
    f.write_text(textwrap.dedent("""
        import torch
        from helper_layers import WIDTH  # a neighbour of the file

        class Factory:
            @staticmethod
            def create():
                return torch.nn.Sequential(torch.nn.Conv2d(3, WIDTH, 1), torch.nn.Dropout(0.5))
    """))
    model, _ = load_model_spec(f"{f}:Factory.create")
    assert model[0].out_channels == 4


@pytest.mark.parametrize("spec, match, kind", [  # a spec naming nothing is a bad argument (exit 2); one that
    ("tests._tiny_models", "expected 'package.module:factory'", ConfigError),  # exists but fails, a model error (4)
    ("no_such_package.models:make", "no module named 'no_such_package'", ConfigError),
    ("tests._tiny_models:missing", "no attribute 'missing'", ConfigError),
    ("tests._tiny_models:SIZE", "not a callable", ModelError),
    ("/nonexistent/dir/det.py:make", "does not exist", ConfigError),
    ("tests._tiny_models:broken_factory", "factory raised RuntimeError: weights not found$", ModelError),
    ("tests._tiny_models:not_a_model", "returned int", ModelError),
])
def test_bad_specs_raise_model_error(spec, match, kind):
    with pytest.raises(kind, match=match) as e:
        load_model_spec(spec)
    assert spec in str(e.value) and "\n" not in str(e.value)


def test_file_spec_that_fails_to_import(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("raise ImportError('needs detectron2')\n")
    with pytest.raises(ModelError, match="importing .* failed: ImportError: needs detectron2"):
        load_model_spec(f"{f}:make")
