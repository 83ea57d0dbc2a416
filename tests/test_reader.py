import numpy as np
import pytest
from PIL import Image

from novelty.reader import decode, read_file, to_rgb
from tests.conftest import jpeg_bytes


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(mode):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (8, 8)).astype(np.uint16))
    elif mode in ("I", "F"):
        img = base.convert("L").convert(mode)
    else:
        img = base.convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (8, 8)


def test_sixteen_bit_is_rescaled_not_clipped():
    a = np.full((4, 4), 65535, np.uint16)
    a[0, 0] = 0
    out = np.asarray(to_rgb(Image.fromarray(a)))
    assert out[1, 1, 0] == 255 and out[0, 0, 0] == 0
    half = np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 32768, np.uint16))))
    assert 120 < half[0, 0, 0] < 135


def test_transparency_is_composited_over_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(img))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (80, 40), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    d = decode(jpeg_bytes(img, exif=exif), None, 10**8)
    assert d.reason is None and d.image.size == (40, 80)


def test_draft_mode_decodes_a_smaller_jpeg_but_never_below_the_input_size():
    img = Image.new("RGB", (2000, 1000), (10, 200, 10))
    data = jpeg_bytes(img)
    full = decode(data, None, 10**8).image
    small = decode(data, 224, 10**8).image
    assert full.size == (2000, 1000)
    assert small.size[0] < 2000 and min(small.size) >= 224


@pytest.mark.parametrize(
    "data, kind",
    [(b"", "empty file"), (b"GIF89a not really", "decode error"), (b"plain text" * 20, "not an image")],
)
def test_bad_bytes_give_reasons(data, kind):
    d = decode(data, None, 10**8)
    assert d.image is None and d.reason.split(":")[0] in (kind, "not an image", "truncated")


def test_truncated_jpeg_is_a_failure():
    data = jpeg_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    d = decode(data[: len(data) // 2], None, 10**8)
    assert d.image is None and d.reason.startswith("truncated")


def test_pixel_limit_rejects_before_decoding():
    img = Image.new("L", (300, 300))
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG")
    d = decode(buf.getvalue(), None, max_pixels=200 * 200)
    assert d.image is None and d.reason.startswith("too large")


def test_missing_file(tmp_path):
    assert read_file(str(tmp_path / "nope.jpg"), None, 10**8).reason == "not found"


def test_hash_is_of_the_bytes():
    a = decode(b"abc", None, 10**8)
    b = decode(b"abc", None, 10**8)
    c = decode(b"abd", None, 10**8)
    assert a.hash == b.hash != c.hash


def test_an_animated_gif_is_its_first_frame():
    import io

    rng = np.random.default_rng(2)
    a = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).convert("P")
    b = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).convert("P")
    anim, first = io.BytesIO(), io.BytesIO()
    a.save(anim, format="GIF", save_all=True, append_images=[b])
    a.save(first, format="GIF")
    got, want = decode(anim.getvalue(), None, 10 ** 6), decode(first.getvalue(), None, 10 ** 6)
    assert got.reason is None and got.image.mode == "RGB" and got.image.size == (40, 30)
    np.testing.assert_array_equal(np.asarray(got.image), np.asarray(want.image))


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_decode_workers_ask_the_kernel_to_die_with_their_run():
    """die_with_parent (the loaders' worker_init_fn) sets PR_SET_PDEATHSIG to SIGKILL, so
    kill -9 of a run takes its workers with it at once instead of leaving orphans that
    print a traceback when they find their pipe closed; read back with PR_GET_PDEATHSIG
    in a fresh process."""
    import subprocess
    import sys

    code = ("import ctypes, signal\n"
            "from novelty.reader import die_with_parent\n"
            "libc = ctypes.CDLL(None)\n"
            "sig = ctypes.c_int(0)\n"
            "libc.prctl(2, ctypes.byref(sig))\n"  # PR_GET_PDEATHSIG
            "before = sig.value\n"
            "die_with_parent(0)\n"
            "libc.prctl(2, ctypes.byref(sig))\n"
            "print(before, sig.value, int(signal.SIGKILL))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, after, kill = map(int, out)
    assert before == 0 and after == kill
