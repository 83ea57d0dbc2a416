"""`novelty uncertainty` with torchvision's own models (weights=None) as the detector
spec: they load wherever torchvision is installed, including a CPU torch paired with a
CUDA torchvision (_compat.py).

The scoring runs in a child process: in this one, build-index (and any earlier test
that loaded open_clip) has already imported torchvision through _compat's workaround,
which would hide a spec loader that skips it.
"""
import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from novelty.sample import scene
from novelty.store import open_store
from tests.conftest import TINY, run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")

FACTORIES = """
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn
    from torchvision.models.segmentation import fcn_resnet50, lraspp_mobilenet_v3_large

    def lraspp():  # no dropout of its own
        return lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)

    def fcn():  # Dropout(0.1) in its head
        return fcn_resnet50(weights=None, weights_backbone=None, num_classes=3, aux_loss=False)

    def faster_rcnn():
        return fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3)
"""


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("tv")
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    for i in range(3):
        scene(rng, i, 64)[0].save(root / "imgs" / f"{i}.png")
    (root / "tv_models.py").write_text(textwrap.dedent(FACTORIES))
    r = run("build-index", "--index", root / "idx", "--model", TINY, "--pretrained", "none", "--unlabeled", root / "imgs")
    assert r.exit_code == 0, r.output
    return root


def uncertainty(root, factory: str, kind: str, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "novelty", "uncertainty", "--detector", f"{root / 'tv_models.py'}:{factory}",
           "--kind", kind, "--passes", 2, "--workers", 0, "--index", root / "idx", *args]
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)


def last_run(root) -> dict:
    with open_store(root / "idx") as st:
        q = "SELECT image, value, reason FROM uncertainty WHERE run=(SELECT MAX(id) FROM runs WHERE kind='uncertainty')"
        return {i: (v, reason) for i, v, reason in st.db.execute(q)}


@pytest.mark.parametrize("factory, args", [("lraspp", ["--inject-dropout", 0.2]), ("fcn", [])])
def test_torchvision_segmenter_scores(small_index, factory, args):
    p = uncertainty(small_index, factory, "segmentation", *args)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "3 images scored, 0 failed" in p.stdout, p.stdout + p.stderr
    got = last_run(small_index)
    assert len(got) == 3 and all(v is not None and v >= 0 and reason is None for v, reason in got.values())
    if factory == "fcn":  # untrained LR-ASPP's features vanish (max 1e-9), so its passes agree exactly; FCN's do not
        assert all(v > 0 for v, _ in got.values())


def test_torchvision_detector_loads_and_its_compiled_ops_decide(small_index):
    from novelty import _compat

    _compat.import_torchvision()
    p = uncertainty(small_index, "faster_rcnn", "detection", "--inject-dropout", 0.2)
    got = last_run(small_index)
    assert len(got) == 3 and "Traceback" not in p.stderr, p.stdout + p.stderr
    if not _compat.patched:  # torchvision's ops loaded: its detectors run
        assert p.returncode == 0 and "3 images scored, 0 failed" in p.stdout, p.stdout + p.stderr
        return
    # the model loads, but its forward ends in nms, which has no kernel here: every image
    # is recorded with torchvision's reason, and the run says nothing could be scored
    assert p.returncode == 1 and "no image could be scored" in p.stderr, p.stdout + p.stderr
    assert all(v is None and reason.startswith("RuntimeError: Couldn't load custom C++ ops") for v, reason in got.values())
