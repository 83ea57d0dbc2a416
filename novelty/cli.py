"""The `novelty` command line: parse, call the library, print. The only module that
imports typer. Library errors (NoveltyError) become one line on stderr and a
non-zero exit code; nothing here computes."""
from __future__ import annotations

import functools
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import DEFAULT_INDEX, DEFAULT_MODEL, BuildCfg, EncoderCfg, ReaderCfg
from .errors import ConfigError, NoveltyError

app = typer.Typer(
    name="novelty",
    help="Choose which unlabeled images to label next: embed, index, score, select.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

IndexOpt = Annotated[Path, typer.Option("--index", help="Index directory.", file_okay=False)]


class Split(str, Enum):
    labeled = "labeled"
    unlabeled = "unlabeled"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def err(msg: str) -> None:
    typer.echo(f"novelty: {msg}", err=True)


def command(fn):
    """Register a command whose NoveltyErrors become one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NoveltyError as e:
            err(f"error: {e}")
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err("interrupted; finished shards are kept, re-run the same command to resume")
            raise typer.Exit(130) from None

    return app.command()(wrapper)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False):
    logging.basicConfig(format="novelty: %(message)s", level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("novelty").setLevel(logging.INFO if verbose else logging.WARNING)
    # open_clip warns on the root logger when it creates random weights on purpose
    logging.getLogger().addFilter(lambda r: "No pretrained weights loaded" not in r.getMessage())


def progress_bar(desc: str, unit: str = "img"):
    """A tqdm bar with rate and ETA on stderr; returns a factory for the library."""
    from tqdm import tqdm

    bars = []

    def factory(total: int):
        bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, smoothing=0.05)
        bars.append(bar)
        return bar.update

    def close():
        for b in bars:
            b.close()

    factory.close = close
    return factory


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


# ---------------------------------------------------------------------------- index
@command
def build_index(
    labeled: Annotated[Optional[list[Path]], typer.Option("--labeled", help="Labeled images: a directory or a list file. Repeatable.")] = None,
    unlabeled: Annotated[Optional[list[Path]], typer.Option("--unlabeled", help="Unlabeled images: a directory or a list file. Repeatable.")] = None,
    index: IndexOpt = DEFAULT_INDEX,
    model: Annotated[str, typer.Option(help="open_clip model name, or a model config .json.")] = DEFAULT_MODEL,
    pretrained: Annotated[str, typer.Option(help="'auto' (a LAION tag), an open_clip tag, a local weights file, or 'none' (random).")] = "auto",
    device: Annotated[Device, typer.Option(help="Where the encoder runs; cuda uses half precision.")] = Device.auto,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    workers: Annotated[int, typer.Option(help="Decode worker processes; -1 chooses from the device.", min=-1)] = -1,
    shard_size: Annotated[int, typer.Option(help="Images per shard (the unit of work and of loss on a crash).", min=1)] = 4096,
    retry_failed: Annotated[bool, typer.Option(help="Try images that failed before again.")] = False,
):
    """Embed labeled and unlabeled images into the index. Re-run to resume or to add sources."""
    from .indexer import build_index as run

    if not labeled and not unlabeled:
        raise ConfigError("give at least one --labeled or --unlabeled source")
    cfg = BuildCfg(
        encoder=EncoderCfg(model=model, pretrained=pretrained, device=device.value),
        reader=ReaderCfg(batch_size=batch_size, workers=workers),
        shard_size=shard_size,
        retry_failed=retry_failed,
    )
    bar = progress_bar("embedding")
    try:
        s = run(index, labeled or [], unlabeled or [], cfg, progress_factory=bar)
    finally:
        bar.close()
    typer.echo(f"index {index}: {s.scanned} images scanned, {s.new} new, {s.changed} changed, {s.unchanged} unchanged"
               + (f", {s.resumed} resumed from an interrupted run" if s.resumed else ""))
    typer.echo(f"  embedded  {s.embedded} in {s.embed_seconds:.1f}s ({s.rate:.1f} img/s), {s.shards} shard(s); run took {s.seconds:.1f}s")
    typer.echo(f"  skipped   {s.unchanged} unchanged" + (f", {s.moved} moved to another split" if s.moved else ""))
    reasons = ", ".join(f"{k}: {v}" for k, v in s.failed_by_reason.items())
    typer.echo(f"  failed    {s.failed}" + (f" ({reasons})" if reasons else ""))
    if s.duplicate_groups:
        typer.echo(f"  duplicates {s.duplicate_images} images are byte-identical copies in {s.duplicate_groups} group(s)")


@command
def import_embeddings(
    vectors_file: Annotated[Path, typer.Argument(metavar="VECTORS.npy", exists=True, dir_okay=False, help="float array [n, d].")],
    ids: Annotated[Path, typer.Option("--ids", exists=True, dir_okay=False, help="One id per line, in row order.")],
    split: Annotated[Split, typer.Option(help="Which split the vectors belong to.")],
    index: IndexOpt = DEFAULT_INDEX,
    model: Annotated[str, typer.Option(help="A name for the model that made these vectors.")] = "imported",
):
    """Add vectors computed elsewhere (e.g. the detector's backbone). Rows are L2-normalised."""
    from .importer import import_embeddings as run

    n = run(index, vectors_file, ids, split.value, model)
    typer.echo(f"imported {n} vectors into {index} as {split.value}")


@command
def sample(
    out: Annotated[Path, typer.Argument(help="Folder to write labeled/ and unlabeled/ into.", file_okay=False)],
    n_labeled: Annotated[int, typer.Option(min=1)] = 60,
    n_unlabeled: Annotated[int, typer.Option(min=1)] = 240,
    seed: int = 0,
):
    """Write a small generated image set (a few domains, near-copies, broken files) to try novelty on."""
    from .sample import SampleCfg, make_sample

    c = make_sample(out, SampleCfg(n_labeled=n_labeled, n_unlabeled=n_unlabeled, seed=seed))
    typer.echo(f"wrote {c['labeled']} labeled and {c['unlabeled']} unlabeled images (+{c.get('broken', 0)} broken files) to {out}")


# --------------------------------------------------------------------------- select
@command
def select(
    budget: Annotated[int, typer.Option(help="How many images to pick.")],
    strategy: Annotated[Optional[str], typer.Option(help="kcenter, hybrid, novelty, uncertainty or random; default: hybrid when uncertainty scores exist, else kcenter.")] = None,
    uncertainty_weight: Annotated[float, typer.Option("--uncertainty-weight", help="beta in w = u^beta for hybrid (0 ignores uncertainty).")] = 1.0,
    out: Annotated[Path, typer.Option(help="Output file: .csv, .jsonl or .parquet; a Label Studio file is written beside it.", dir_okay=False)] = Path("selection.csv"),
    seed: Annotated[int, typer.Option(help="Seed for the random strategy.")] = 0,
    radius: Annotated[Optional[float], typer.Option(help="Cosine distance for labeled_neighbors; default: 5th percentile of labeled-to-labeled nearest-neighbour distances.")] = None,
    approximate: Annotated[bool, typer.Option("--approximate", help="IVF first pass instead of the exact one (faster, recall < 1).")] = False,
    device: Annotated[Device, typer.Option(help="Where the greedy loop runs.")] = Device.auto,
    index: IndexOpt = DEFAULT_INDEX,
):
    """Pick the images to label next and write them, best first."""
    from .export import get_writer, write_selection
    from .selection import SelectCfg
    from .selection import select as run

    get_writer(out)  # a bad extension fails before any work
    r = run(index, SelectCfg(budget=budget, strategy=strategy, beta=uncertainty_weight, seed=seed, radius=radius,
                             approximate=approximate, device=device.value))
    ls = write_selection(out, r.rows)
    s = r.summary
    for w in r.warnings:
        err(f"warning: {w}")
    typer.echo(f"selected {s['picks']} of {s['pool']} unlabeled images with {s['strategy']} (run #{r.run}) -> {out}, {ls.name}")
    typer.echo(f"  covering radius  {s['covering_radius_before']:.4f} before, {s['covering_radius_after']:.4f} after (cosine distance)")
    typer.echo(f"  redundant        {100 * s['redundant_share']:.1f}% of the pool has a labeled image within r = {s['radius']:.4f}")
    t = s["seconds"]
    typer.echo(f"  time             {t['total']:.1f}s (load {t['load']:.1f}s, nearest-labeled {t['first_pass']:.1f}s, selection {t['select']:.1f}s)")


@command
def import_uncertainty(
    scores_file: Annotated[Path, typer.Argument(metavar="FILE.csv", exists=True, dir_okay=False, help="Columns id,uncertainty.")],
    index: IndexOpt = DEFAULT_INDEX,
):
    """Store uncertainty scores computed elsewhere; `select` then defaults to hybrid."""
    from .records import read_uncertainty_csv, save_uncertainty
    from .store import open_store

    with open_store(index, writable=True) as store:
        ids, values = read_uncertainty_csv(store, scores_file)
        run = save_uncertainty(store, {"source": "import", "file": str(scores_file.resolve())}, ids, values)
    typer.echo(f"stored {len(ids)} uncertainty scores (run #{run}); select now defaults to --strategy hybrid")


@command
def info(index: IndexOpt = DEFAULT_INDEX):
    """What the index holds: model, dim, counts per split, failures, size on disk."""
    from .store import open_store

    with open_store(index) as store:
        m = store.manifest
        c = store.counts()
        enc = m.get("encoder", {})
        typer.echo(f"index      {index.resolve()}")
        typer.echo(f"model      {enc.get('kind', '-')} {enc.get('model', '-')} (weights: {enc.get('pretrained', '-')})")
        typer.echo(f"dim        {m.get('dim', '-')}")
        for split in ("labeled", "unlabeled"):
            parts = {st: n for (sp, st), n in c["by_split_status"].items() if sp == split}
            typer.echo(f"{split:<10} {parts.get('embedded', 0)} embedded, {parts.get('failed', 0)} failed, {parts.get('pending', 0)} pending")
        for reason, n in c["failed_by_reason"].items():
            typer.echo(f"  failed: {reason}: {n}")
        groups, images = store.duplicate_hashes()
        if groups:
            typer.echo(f"duplicates {images} byte-identical images in {groups} groups")
        typer.echo(f"disk       {fmt_bytes(store.disk_bytes())}")
        for line in history_lines(store):
            typer.echo(line)


def history_lines(store) -> list[str]:
    rows = store.db.execute("SELECT id, kind, started, finished FROM runs ORDER BY id DESC LIMIT 10").fetchall()
    if not rows:
        return []
    import time

    out = ["history"]
    for rid, kind, started, finished in reversed(rows):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(started))
        out.append(f"  #{rid:<4} {when}  {kind}{'' if finished else '  (interrupted)'}")
    return out


if __name__ == "__main__":
    app()
