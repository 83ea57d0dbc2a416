"""Embedding throughput: decode only, encode only, end to end (images/s).

    python benchmarks/embed_throughput.py --model ViT-B-32 --device cpu --batch-size 32 --workers 1 --n 512

Generates --n JPEGs of --width x --height under benchmarks/_work/ (once), then measures:
  decode   the DataLoader alone: read, hash, draft-decode, orient, preprocess
  encode   the encoder alone on in-memory tensors
  e2e      `build-index` as users run it (DataLoader + encoder + shard commits + FAISS)
e2e / min(decode, encode) says whether the stages overlap (target >= 0.85).
Peak RSS of e2e is measured in a fresh process at n and at 2n: it must not grow with n.
Weights are random (--pretrained none) unless given: speed does not depend on them.
--mmap-threshold MB runs e2e with another glibc mmap threshold than build-index pins
(speed against memory growth; RESULTS.md); --skip decode encode runs e2e alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORK = Path(__file__).parent / "_work" / "embed"


def make_images(n: int, w: int, h: int) -> Path:
    from PIL import Image

    folder = WORK / f"img_{w}x{h}"
    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.jpg")))
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
    for i in range(have, n):
        a = np.kron(np.roll(base, i, axis=1), np.ones((8, 8, 1), np.uint8))  # smooth-ish, JPEG-realistic
        noise = rng.integers(0, 20, a.shape, dtype=np.uint8)
        Image.fromarray(a + noise).save(folder / f"{i:06d}.jpg", quality=90)
    return folder


def subset(folder: Path, n: int) -> Path:
    lst = WORK / f"list_{folder.name}_{n}.txt"
    lst.write_text("\n".join(str(p) for p in sorted(folder.glob("*.jpg"))[:n]) + "\n")
    return lst


def bench_decode(args, lst: Path) -> float:
    from novelty.config import ReaderCfg
    from novelty.encoder import create_encoder
    from novelty.config import EncoderCfg
    from novelty.reader import make_loader
    from novelty.sources import scan
    from novelty.store import create_store

    enc = create_encoder(EncoderCfg(args.model, args.pretrained, args.device))
    root = WORK / "decode_idx"
    shutil.rmtree(root, ignore_errors=True)
    with create_store(root) as st:
        st.sync_sources(scan([], [lst]))
        ids = st.pending_ids()
        loader = make_loader(str(root / "catalog.sqlite"), ids, enc.preprocess, enc.image_size,
                             ReaderCfg(batch_size=args.batch_size, workers=args.workers), enc.device)
        t = time.perf_counter()
        n = sum(len(b[0]) for b in loader)
        return n / (time.perf_counter() - t)


def bench_encode(args) -> float:
    import torch

    from novelty.config import EncoderCfg
    from novelty.encoder import create_encoder

    enc = create_encoder(EncoderCfg(args.model, args.pretrained, args.device))
    x = torch.randn(args.batch_size, 3, enc.image_size, enc.image_size)
    if enc.device == "cuda":
        x = x.pin_memory()
    enc.encode_images(x)  # warm-up
    reps = max(2, args.n // args.batch_size)
    t = time.perf_counter()
    for _ in range(reps):
        enc.encode_images(x)
    return reps * args.batch_size / (time.perf_counter() - t)


def bench_e2e(args, lst: Path) -> tuple[float, float]:
    """In a fresh process: (images/s of the embedding stage, peak RSS in MB)."""
    root = WORK / "e2e_idx"
    shutil.rmtree(root, ignore_errors=True)
    pin = "" if args.mmap_threshold is None else f"""
import novelty.indexer as _ix
from novelty._compat import bounded_heap as _b
_ix.bounded_heap = lambda: _b({int(args.mmap_threshold * 2**20)})  # what build-index pins, overridden
"""
    code = f"""
import json, resource, sys
from pathlib import Path
from novelty.config import BuildCfg, EncoderCfg, ReaderCfg
from novelty.indexer import build_index
{pin}
cfg = BuildCfg(EncoderCfg({args.model!r}, {args.pretrained!r}, {args.device!r}), ReaderCfg(batch_size={args.batch_size}, workers={args.workers}))
s = build_index(Path({str(root)!r}), [], [Path({str(lst)!r})], cfg)
print(json.dumps({{"rate": s.rate, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["rate"], r["rss"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=-1)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--mmap-threshold", type=float, metavar="MB",
                   help="end to end with glibc's M_MMAP_THRESHOLD pinned here instead of build-index's 128 KB "
                        "(novelty/_compat.py:bounded_heap): the speed / memory-growth trade-off")
    p.add_argument("--skip", nargs="*", default=[], choices=("decode", "encode"), help="stages not to measure")
    args = p.parse_args()

    import torch

    folder = make_images(2 * args.n, args.width, args.height)
    lst, lst2 = subset(folder, args.n), subset(folder, 2 * args.n)
    dec = bench_decode(args, lst) if "decode" not in args.skip else float("nan")
    enc = bench_encode(args) if "encode" not in args.skip else float("nan")
    e2e, rss = bench_e2e(args, lst)
    e2e2, rss2 = bench_e2e(args, lst2)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"model {args.model}  device {name}  batch {args.batch_size}  workers {args.workers}  images {args.width}x{args.height} JPEG"
          + ("" if args.mmap_threshold is None else f"  M_MMAP_THRESHOLD {args.mmap_threshold:g} MB"))
    print("| stage | images/s |\n|---|---|")
    print(f"| decode only | {dec:.0f} |\n| encode only | {enc:.1f} |\n| end to end (n={args.n}) | {e2e:.1f} |\n| end to end (n={2 * args.n}) | {e2e2:.1f} |")
    if not args.skip:
        print(f"end to end / min(decode, encode) = {e2e / min(dec, enc):.2f}  (target >= 0.85)")
    print(f"peak RSS of end to end: {rss:.0f} MB at n={args.n}, {rss2:.0f} MB at n={2 * args.n}")


if __name__ == "__main__":
    main()
