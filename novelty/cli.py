"""The `novelty` command line: parse, call the library, print. The only module that
imports typer. Library errors (NoveltyError) become one line on stderr and a
non-zero exit code; nothing here computes."""
from __future__ import annotations

import errno
import functools
import logging
import os
import re
import signal
import sqlite3
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

try:  # typer >= 0.2x carries its own copy of click
    from typer._click import exceptions as _click_errors
except ImportError:  # older typer runs on click itself
    from click import exceptions as _click_errors

from .config import DEFAULT_INDEX, DEFAULT_MODEL, BuildCfg, EncoderCfg, ReaderCfg
from .errors import ConfigError, IndexDamagedError, NoveltyError, Terminated


class _OneLineErrors(typer.core.TyperGroup):
    """Usage errors (a bad choice, a missing option) as one line on stderr and exit code 2,
    like library errors, instead of click's usage box. Help with no arguments stays."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        no_args_help = getattr(_click_errors, "NoArgsIsHelpError", ())  # click >= 8.2
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except no_args_help as e:
            e.show()
            sys.exit(e.exit_code)
        except _click_errors.UsageError as e:
            where = e.ctx.command_path if e.ctx else "novelty"
            err(f"error: {e.format_message()} (see `{where} --help`)")
            sys.exit(e.exit_code)
        except _click_errors.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except typer.Abort:
            err("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="novelty",
    help="Choose which unlabeled images to label next: embed, index, score, select.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

IndexOpt = Annotated[Path, typer.Option("--index", help="Index directory.", file_okay=False)]
LabelStudioRootOpt = Annotated[Optional[Path], typer.Option(
    help="The folder Label Studio serves local files from (LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT): the Label Studio "
         "file then references images as /data/local-files/?d=PATH under it.", file_okay=False)]


class Split(str, Enum):
    labeled = "labeled"
    unlabeled = "unlabeled"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def err(msg: str) -> None:
    typer.echo(f"novelty: {msg}", err=True)


# what a stopped command leaves, said after Ctrl-C or a failed write; the others write
# their outputs atomically at the end, so a stop leaves nothing of theirs
KEPT = {
    "build_index": "finished shards are kept; re-run the same command to resume",
    "merge": "parts merged so far are kept; re-run the same command to merge the rest",
    "uncertainty": "scores committed so far are kept; re-run the same command to resume",
    "import_embeddings": "nothing was imported",
    "mark_labeled": "nothing was changed",
    "exclude": "nothing was changed",
    "sample": "the sample folder may be partly written; run the command again",
    "select": "if `info` lists the run (its files not written), `novelty export --latest` writes them",
}
CANNOT_WRITE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large for this system's file size limit", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied", errno.EROFS: "read-only file system"}
EXIT_CANNOT_WRITE = 6


def cannot_write(e: BaseException) -> str | None:
    """The one line for a write the system refused (a full disk, no permission), else None."""
    if isinstance(e, OSError) and e.errno in CANNOT_WRITE:
        where = e.filename if isinstance(e.filename, str) else None
        return CANNOT_WRITE[e.errno] + (f" writing {where}" if where else "")
    if isinstance(e, OSError) and e.errno is None and re.fullmatch(r"\d+ requested and \d+ written", str(e)):
        return f"a file was cut short ({e}): the disk is full or a file size limit was hit"  # numpy's short write
    from .store import storage_trouble

    if isinstance(e, sqlite3.OperationalError) and storage_trouble(e):
        return f"the catalog could not be written ({e}): check free space and permissions"
    return None


def command(fn):
    """Register a command whose NoveltyErrors become one line and an exit code; so do
    Ctrl-C (130), SIGTERM (143) and a write the system refuses (6), each saying what was
    kept: the command's line in KEPT, or the `kept` the library set on the exception
    where it knows better (an import stopped after its vectors went in)."""
    kept = KEPT.get(fn.__name__, "nothing was written")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _running
        _running = True
        try:
            return fn(*args, **kwargs)
        except NoveltyError as e:
            err(f"error: {e}")
            raise typer.Exit(e.exit_code) from None
        except Terminated as e:
            err(f"stopped (SIGTERM); {getattr(e, 'kept', kept)}")
            raise typer.Exit(128 + signal.SIGTERM) from None
        except KeyboardInterrupt as e:
            err(f"interrupted; {getattr(e, 'kept', kept)}")
            raise typer.Exit(130) from None
        except (OSError, sqlite3.OperationalError) as e:
            why = cannot_write(e)
            if why is None:
                raise
            err(f"error: {why}; {getattr(e, 'kept', kept)}")
            raise typer.Exit(EXIT_CANNOT_WRITE) from None
        finally:
            _running = False

    return app.command()(wrapper)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False):
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)  # a scheduler's stop: cleaned up and said, like Ctrl-C
    # force: bind the handler to this invocation's stderr, not to the first one seen
    logging.basicConfig(format="novelty: %(message)s", level=logging.WARNING, handlers=[_BarSafe(sys.stderr)], force=True)
    logging.getLogger("novelty").setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        for h in logging.getLogger().handlers:
            h.addFilter(_only_novelty)
        # huggingface_hub logs through a handler of its own (a line for each retry of a fetch): errors only, read when
        # it is imported, so set before open_clip loads it
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")


_running = False  # a command is at work: SIGTERM stops it; once it returned, its work is done


def finished() -> None:
    """Said by a command once its work is done and kept, before it prints its summary: a
    SIGTERM from then on is let go, not answered with 'nothing was changed' and 143."""
    global _running
    _running = False


def _terminated(signum, frame) -> None:
    if _running:
        raise Terminated()
    # the command has finished and written what it had to: a TERM while the interpreter shuts down is let
    # go (the next one acts as usual), rather than raised inside an atexit hook or turned into exit 143
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _BarSafe(logging.StreamHandler):
    """Log lines through tqdm.write once tqdm is loaded (a bar may be open): the bar is
    cleared, the line printed on its own, the bar drawn again below it. Written straight
    to the stream, a warning landed at the end of the bar's line and was easy to miss."""

    def emit(self, record: logging.LogRecord) -> None:
        tq = sys.modules.get("tqdm")
        if tq is None:
            return super().emit(record)
        try:
            tq.tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def _only_novelty(record: logging.LogRecord) -> bool:
    """Other libraries log on the root logger what novelty already says in one line
    (open_clip: a failed download, random weights asked for on purpose); --verbose shows them."""
    return record.name.startswith("novelty")


def progress_bar(desc: str, unit: str = "img"):
    """A tqdm bar with rate and ETA on stderr; returns a factory for the library."""
    from tqdm import tqdm

    bars = []

    def factory(total: int, what: str | None = None, what_unit: str | None = None):
        """A library stage may name itself (select: its first pass, then the picks)."""
        for b in bars:  # one bar at a time: a new stage closes the one before
            b.close()
        bar = tqdm(total=total, desc=what or desc, unit=what_unit or unit, dynamic_ncols=True, file=sys.stderr,
                   smoothing=0.05)
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
    labeled: Annotated[Optional[list[Path]], typer.Option("--labeled", metavar="SRC", help="Labeled images: a directory or a list file. Repeatable.")] = None,
    unlabeled: Annotated[Optional[list[Path]], typer.Option("--unlabeled", metavar="SRC", help="Unlabeled images: a directory or a list file. Repeatable.")] = None,
    index: IndexOpt = DEFAULT_INDEX,
    model: Annotated[str, typer.Option(help="open_clip model name, or a model config .json.")] = DEFAULT_MODEL,
    pretrained: Annotated[str, typer.Option(help="'auto' (a LAION tag), an open_clip tag, a local weights file, or 'none' (random).")] = "auto",
    device: Annotated[Device, typer.Option(help="Where the encoder runs; cuda uses half precision.")] = Device.auto,
    batch_size: Annotated[int, typer.Option(min=1, max=1 << 20)] = 32,
    workers: Annotated[int, typer.Option(help="Decode worker processes; -1 chooses from the device.", min=-1)] = -1,
    shard_size: Annotated[int, typer.Option(help="Images per shard (the unit of work and of loss on a crash); a shard closes at the end of the batch that reaches it, so it holds whole batches.", min=1)] = 4096,
    retry_failed: Annotated[bool, typer.Option(help="Try images that failed before again.")] = False,
    part: Annotated[Optional[str], typer.Option(metavar="K/N", help="Only part K of N of the images (split by a hash of the path), into this machine's own --index; `novelty merge` joins the parts.")] = None,
):
    """Embed labeled and unlabeled images into the index. Re-run to resume or to add sources."""
    try:
        from .indexer import build_index as run  # torch and open_clip: seconds, and nothing written yet
        from .sources import parse_part
    except KeyboardInterrupt as e:
        e.kept = "nothing was written"
        raise

    if not labeled and not unlabeled:
        raise ConfigError("give at least one --labeled or --unlabeled source")
    cfg = BuildCfg(
        encoder=EncoderCfg(model=model, pretrained=pretrained, device=device.value),
        reader=ReaderCfg(batch_size=batch_size, workers=workers),
        shard_size=shard_size,
        retry_failed=retry_failed,
        part=parse_part(part) if part is not None else None,
    )
    bar = progress_bar("embedding")
    try:
        s = run(index, labeled or [], unlabeled or [], cfg, progress_factory=bar)
        finished()
    finally:
        bar.close()
    typer.echo(f"index {index}{f' (part {part})' if part else ''}: {s.scanned} images scanned, {s.new} new, {s.changed} changed, {s.unchanged} unchanged"
               + (f", {s.retried} failed before and tried again (--retry-failed)" if s.retried else "")
               + (f", {s.requeued} from missing or damaged shards" if s.requeued else "")
               + (f", {s.resumed} resumed from an interrupted run" if s.resumed else ""))
    rate = f" ({s.rate:.1f} img/s)" if s.embedded else ""
    typer.echo(f"  embedded  {s.embedded} in {s.embed_seconds:.1f}s{rate}, {s.shards} shard(s); run took {s.seconds:.1f}s")
    typer.echo(f"  skipped   {s.unchanged} unchanged" + (f", {s.moved} moved to another split" if s.moved else "")
               + (f", {s.kept_labeled} kept labeled (mark-labeled)" if s.kept_labeled else ""))
    if s.gone:
        typer.echo(f"  gone      {s.gone} unlabeled image(s) deleted from their folder since indexed: out of the pool"
                   + (f" ({s.gone_elsewhere} in a folder or list not given this time)" if s.gone_elsewhere else ""))
    if s.linked:
        typer.echo(f"  linked    {s.linked} path(s) reach a file indexed under another path (a symlink or hard link): "
                   f"one image each")
    if s.unlabeled_as_labeled:
        err(f"note: {len(s.unlabeled_as_labeled)} path(s) given under --unlabeled reach files of a --labeled source, so "
            f"those images are labeled (e.g. {s.unlabeled_as_labeled[0]})")
    if s.labeled_missing:
        typer.echo(f"  missing   {s.labeled_missing} labeled image(s) are not in their folder any more: still centers, "
                   f"from their vectors")
    if s.lost_shards:
        typer.echo(f"  requeued  {s.requeued} image(s) of {len(s.lost_shards)} missing or damaged shard(s): embedded again")
    reasons = ", ".join(f"{k}: {v}" for k, v in s.failed_by_reason.items())
    typer.echo(f"  failed    {s.failed}" + (f" ({reasons})" if reasons else ""))
    if s.duplicate_groups:
        typer.echo(f"  duplicates {s.duplicate_images} images are byte-identical copies in {s.duplicate_groups} group(s)")
    _say_content(s.content)


def _say_content(c) -> None:
    """What build-index's bytes said about earlier rows (novelty._content)."""
    ex = c.examples
    took = [f"{n} {what}" for n, what in ((c.moved_marked, "marked labeled"), (c.moved_excluded, "excluded"),
                                           (c.moved_scores, "uncertainty score(s)")) if n]
    if c.moved:
        typer.echo(f"  moved     {c.moved} image(s) turned up at a new path (e.g. {ex.get('moved')}): their old rows left the pool"
                   + (f"; carried to the new paths: {', '.join(took)}" if took else ""))
    elif took:  # rows recorded as moved before, whose marks waited for their bytes to turn up unlabeled
        e = next(ex[k] for k in ("moved_marked", "moved_excluded", "moved_scores") if k in ex)
        typer.echo(f"  moved     carried to images at a new path (e.g. {e}): {', '.join(took)}")
    if c.changed:
        typer.echo(f"  new bytes {c.changed} scored image(s) changed since (e.g. {ex.get('changed')}): "
                   f"{c.scores_dropped} uncertainty score(s) of their old content dropped, run uncertainty again")
    if c.changed_marked or c.changed_excluded:
        kept = " and ".join(f"{n} {what}" for n, what in ((c.changed_marked, "marked labeled"), (c.changed_excluded, "excluded"))
                            if n)
        e = ex.get("changed_marked") or ex.get("changed_excluded")
        err(f"warning: {kept} image(s) hold new bytes (e.g. {e}) and keep that status; if the new pictures are not "
            f"labeled, or should be candidates again, use `mark-labeled --undo` or `exclude --undo` on them")


@command
def merge(
    parts: Annotated[list[Path], typer.Argument(metavar="PART...", help="Index directories to merge, e.g. those of build-index --part K/N.")],
    index: IndexOpt = DEFAULT_INDEX,
):
    """Join indexes built apart (build-index --part K/N on several machines) into --index. Re-run to resume."""
    from .merge import merge_indexes

    bar = progress_bar("merging", unit="part")
    try:
        s = merge_indexes(index, parts, progress_factory=bar)
        finished()
    finally:
        bar.close()
    if s.lost.names:
        err(f"warning: {len(s.lost.names)} shard(s) of {index} were missing or damaged: their {s.lost.lost} vector(s) "
            f"are taken again from the parts that hold them (every part is read again)")
    for p in s.parts:
        held = f" (part {', '.join(p.held)})" if p.held else ""
        if p.unchanged:
            typer.echo(f"  {p.path}{held}: unchanged since merged into this index: nothing to take")
        else:
            typer.echo(f"  {p.path}{held}: {p.added} added, {p.present} already in"
                       + (f", {p.replaced} replaced a failed row or an older copy" if p.replaced else "")
                       + (f", {p.moved} moved to labeled" if p.moved else "")
                       + (f", {p.excluded} excluded as in the part" if p.excluded else "")
                       + (f", {p.gone} deleted from their folder or moved: out of the pool" if p.gone else "")
                       + f"; {p.shards} shard(s) copied")
        if p.pending:
            err(f"warning: {p.pending} image(s) of {p.path} are not embedded yet and were left out: finish its build-index and merge again")
        if p.clashes:
            err(f"warning: {p.clashes} image(s) of {p.path} are in {index} under the other kind of key "
                f"(an imported id there, a path here, or the reverse) and were left out")
    _say_content(s.content)
    typer.echo(f"index {index}: {s.labeled} labeled and {s.unlabeled} unlabeled embedded, {s.failed} failed; "
               f"{len(s.parts)} index(es) merged in {s.seconds:.1f}s")
    if s.uncertainty_run is not None:
        typer.echo(f"  uncertainty: {s.uncertainty_scores} scores of the parts, as run #{s.uncertainty_run}; select now defaults to --strategy hybrid")
    if s.uncertainty_note:
        err(f"warning: {s.uncertainty_note}")
    if s.missing_parts:
        err(f"warning: part(s) {', '.join(s.missing_parts[:8])}{' …' if len(s.missing_parts) > 8 else ''} are not merged yet")


@command
def import_embeddings(
    vectors_file: Annotated[Path, typer.Argument(metavar="VECTORS.npy", exists=True, dir_okay=False, help="A float array of n rows of d values.")],
    ids: Annotated[Path, typer.Option("--ids", exists=True, dir_okay=False, help="One id per line, in row order.")],
    split: Annotated[Split, typer.Option(help="Which split the vectors belong to.")],
    paths: Annotated[bool, typer.Option("--paths", help="The ids are image paths (relative ones read against the list's folder, as build-index reads a list): stored as paths, so uncertainty, report and mark-labeled by path open the images.")] = False,
    index: IndexOpt = DEFAULT_INDEX,
    model: Annotated[str, typer.Option(help="A name for the model that made these vectors.")] = "imported",
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="Skip ids (paths, with --paths) already embedded in the index instead of refusing them: re-import a whole file after a lost shard, or a growing dump.")] = False,
):
    """Add vectors computed elsewhere (e.g. the detector's backbone). Rows are L2-normalised."""
    from .importer import import_embeddings as run

    r = run(index, vectors_file, ids, split.value, model, paths=paths, skip_existing=skip_existing)
    finished()
    if r.missing:
        err(f"warning: {len(r.missing)} of {r.n} paths are not image files now (gone, unreadable or a folder), "
            f"e.g. {r.missing[0]}; uncertainty and report will record them as failed")
    typer.echo(f"imported {r.n} vectors into {index} as {split.value}" + (" under their image paths" if paths else "")
               + (f"; skipped {r.skipped} already in the index" if skip_existing else ""))
    if r.other_vector or r.other_split:
        err(f"warning: of the {r.skipped} skipped, {r.other_vector} have another vector in the file than in the index and "
            f"{r.other_split} are indexed as the other split; they were kept as indexed (a regenerated dump belongs "
            f"in a new index; mark-labeled moves images between splits)")


@command
def sample(
    out: Annotated[str, typer.Argument(metavar="DIR", help="Folder to write labeled/ and unlabeled/ into.")],
    n_labeled: Annotated[int, typer.Option(min=1, max=100_000)] = 60,
    n_unlabeled: Annotated[int, typer.Option(min=1, max=100_000)] = 240,
    seed: Annotated[int, typer.Option(min=0)] = 0,
):
    """Write a small generated image set (a few domains, near-copies, broken files) to try novelty on."""
    from .sample import SampleCfg, make_sample

    if not out.strip():  # Path("") is the current folder: say so instead
        raise ConfigError("the output folder is empty; give a folder name (. for the current folder)")
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"{out} is a file, not a folder")
    try:
        c = make_sample(out, SampleCfg(n_labeled=n_labeled, n_unlabeled=n_unlabeled, seed=seed))
        finished()
    except OSError as e:
        raise ConfigError(f"cannot write into {out}: {e.strerror or e}") from None
    extra = f"{c['copies']} exact copy of a labeled image" + (f" and {c['broken']} broken files" if c.get("broken") else "")
    typer.echo(f"wrote {c['labeled']} labeled and {c['unlabeled']} unlabeled images to {out}, plus, in unlabeled/, {extra}")
    if c["replaced"]:
        err(f"note: {c['replaced']} files of an earlier sample in {out} were removed first; an index built on them "
            f"finds them gone (or changed) at its next build-index")


# --------------------------------------------------------------------------- select
def _warn_outside(outside: int, root: Path | None) -> None:
    if outside:
        err(f"warning: {outside} picked image(s) lie outside --label-studio-root {root}; their Label Studio tasks hold "
            f"the plain path, which Label Studio cannot serve")


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
    label_studio_root: LabelStudioRootOpt = None,
    index: IndexOpt = DEFAULT_INDEX,
):
    """Pick the images to label next and write them, best first."""
    from .export import check_label_studio_root, check_selection_out, get_writer, write_selection
    from .selection import SelectCfg
    from .selection import select as run

    get_writer(out)  # a bad extension, a missing pyarrow or folder fails before any work
    check_selection_out(out)
    check_label_studio_root(label_studio_root)
    bar = progress_bar("picking", unit="pick")
    try:
        r = run(index, SelectCfg(budget=budget, strategy=strategy, beta=uncertainty_weight, seed=seed, radius=radius,
                                 approximate=approximate, device=device.value), progress_factory=bar)
    finally:
        bar.close()
    for w in r.warnings:  # after the bars: a warning printed under an open bar shares its line
        err(f"warning: {w}")
    try:
        ls, outside = write_selection(out, r.rows, label_studio_root)
        finished()
    except BaseException:
        from .records import note_files_not_written

        note_files_not_written(index, r.run)  # info then says so; `export --run` writes them once there is space
        raise
    _warn_outside(outside, label_studio_root)
    s = r.summary
    kept_out = f" ({s['excluded']} excluded)" if s.get("excluded") else ""
    from .strategies import USES_UNCERTAINTY

    u = s.get("uncertainty") if s["strategy"] in USES_UNCERTAINTY else None
    scores = (f", scores of uncertainty run #{u['run']}" + (" (imported)" if u.get("source") == "import" else "")) if u else ""
    typer.echo(f"selected {s['picks']} of {s['pool']} unlabeled images{kept_out} with {s['strategy']} (run #{r.run}{scores}) "
               f"-> {out}, {ls}")
    before = f"{s['covering_radius_before']:.4f} before" if s["labeled"] else "no labeled image yet"
    typer.echo(f"  covering radius  {before}, {s['covering_radius_after']:.4f} after (cosine distance)")
    if s["labeled"] < 2 and radius is None:  # no labeled pair to measure the default radius on
        typer.echo("  redundant        - (the default radius needs 2 labeled images; give --radius)")
    else:
        typer.echo(f"  redundant        {100 * s['redundant_share']:.1f}% of the pool has a labeled image within r = {s['radius']:.4f}")
    t = s["seconds"]
    typer.echo(f"  time             {t['total']:.1f}s (load {t['load']:.1f}s, nearest-labeled {t['first_pass']:.1f}s, selection {t['select']:.1f}s)")


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Kind(str, Enum):
    detection = "detection"
    segmentation = "segmentation"


@command
def uncertainty(
    detector: Annotated[str, typer.Option(help="'package.module:factory' or 'path/to/file.py:factory' returning an nn.Module or (model, preprocess).")],
    kind: Annotated[Kind, typer.Option(help="What the model returns: torchvision-style detections, or segmentation logits.")],
    passes: Annotated[int, typer.Option(help="MC-dropout passes T per image.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Images per batch (each runs its T passes as one batched forward).")] = 8,
    device: Annotated[Device, typer.Option()] = Device.auto,
    seed: Annotated[int, typer.Option(help="Seeds the dropout masks: same seed, same scores.")] = 0,
    aggregation: Annotated[str, typer.Option(help="Objects -> image score (detection): max, mean, sum or topk-mean.")] = "max",
    topk: Annotated[int, typer.Option(help="k of topk-mean.")] = 3,
    score_thresh: Annotated[float, typer.Option(help="Detection: a box counts as present in a pass at this score (your operating point).")] = 0.5,
    top_percent: Annotated[float, typer.Option(help="Segmentation: mean over this % most uncertain pixels.")] = 5.0,
    inject_dropout: Annotated[float, typer.Option("--inject-dropout", help="Add Dropout(P) before the model's head layers (for models without dropout).")] = 0.0,
    image_size: Annotated[Optional[int], typer.Option(help="Resize images to this square size (default preprocess only).")] = None,
    max_pixels: Annotated[int, typer.Option("--max-pixels", help="The largest model input (H*W) scored (4096*4096): a larger image is recorded as failed, 'too large', and the run goes on. Images kept at their size are checked on the file, before decoding; resized ones (--image-size, or your preprocess) after resizing, and decoding stops at PIL's 89.5 MP bomb limit (or this, if higher).")] = 4096 * 4096,
    workers: Annotated[int, typer.Option(min=0)] = 1,
    share_trunk: Annotated[bool, typer.Option(help="Run the modules that no dropout layer touches (the backbone) once per image instead of once per pass; the scores are the same up to float rounding.")] = True,
    precision: Annotated[Precision, typer.Option(help="Run the passes under torch.autocast: bf16 (GPUs, and CPUs with AVX512-BF16 or AMX) or fp16 (CUDA only). Scores then differ from fp32's by rounding; an interrupted run resumes only at its own precision.")] = Precision.fp32,
    index: IndexOpt = DEFAULT_INDEX,
):
    """Score unlabeled images by MC-dropout disagreement of your detector; `select` then uses hybrid."""
    from .detector import DetectorCfg, score_index

    cfg = DetectorCfg(spec=detector, kind=kind.value, passes=passes, batch_size=batch_size, seed=seed, device=device.value,
                      aggregation=aggregation, topk=topk, score_thresh=score_thresh, top_percent=top_percent, inject_dropout=inject_dropout,
                      image_size=image_size, workers=workers, share_trunk=share_trunk, precision=precision.value,
                      max_pixels=max_pixels)
    bar = progress_bar("mc-dropout")
    try:
        s = score_index(index, cfg, progress_factory=bar)
        finished()
    finally:
        bar.close()
    typer.echo(f"uncertainty run #{s.run}: {s.scored} images scored, {s.failed} failed, in {s.seconds:.1f}s"
               + (f" (and {s.resumed} before the run was interrupted: {s.with_score} scored, {s.without_score} failed "
                  f"in all)" if s.resumed else ""))
    if s.failed_by_reason:
        typer.echo("  failed: " + ", ".join(f"{k}: {v}" for k, v in s.failed_by_reason.items()))
        for what, reason in s.failed_example.items():
            if reason != what and what not in ("too large", "not found"):  # the kind says it all for those
                typer.echo(f"    e.g. {reason[:300]}")
    if s.failed_by_reason.get("too large"):
        typer.echo(f"  too large: over --max-pixels {max_pixels} (or PIL's bomb limit), not scored; "
                   "use --image-size S or raise --max-pixels")
    if s.with_score == 0:
        err(f"error: no image could be scored in run #{s.run}; `select` ignores a run without scores")
        raise typer.Exit(1)
    how = f"aggregation {aggregation}" if kind is Kind.detection else f"mean of the top {top_percent:g}% of pixels"
    if precision is not Precision.fp32:
        how += f", {precision.value}"
    typer.echo(f"  mean score {s.mean:.4g} (T={passes}, {kind.value}, {how}); select now defaults to --strategy hybrid")


@command
def import_uncertainty(
    scores_file: Annotated[Path, typer.Argument(metavar="FILE.csv", exists=True, dir_okay=False, help="Columns id,uncertainty.")],
    index: IndexOpt = DEFAULT_INDEX,
):
    """Store uncertainty scores computed elsewhere; `select` then defaults to hybrid."""
    from .records import pool_scores, read_uncertainty_csv, save_uncertainty
    from .store import open_store

    with open_store(index, writable=True) as store:
        p = pool_scores(store, scores_file, *read_uncertainty_csv(store, scores_file))
        run = save_uncertainty(store, {"source": "import", "file": str(scores_file.resolve())}, p.ids, p.values)
    finished()
    typer.echo(f"stored {len(p.ids)} uncertainty scores (run #{run}); select now defaults to --strategy hybrid")
    if p.labeled:
        err(f"warning: ignored {p.labeled} score(s) of labeled images; select ranks only unlabeled ones")
    if p.not_embedded:
        err(f"warning: {p.not_embedded} score(s) are of images without a vector (not embedded yet, or failed): select "
            f"uses them once build-index embeds them")
    if p.excluded:
        err(f"warning: {p.excluded} score(s) are of images exclude keeps out of selection; used if they are included again")


# ---------------------------------------------------------- inspect, report, label
class Scope(str, Enum):
    labeled = "labeled"
    unlabeled = "unlabeled"
    all = "all"


@command
def neighbors(
    query: Annotated[Optional[str], typer.Argument(help="An id or path in the index, or an image file to embed with the index's model.")] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Search by a text prompt (the CLIP text tower) instead.")] = None,
    k: Annotated[int, typer.Option("--k", help="How many neighbours.")] = 10,
    split: Annotated[Scope, typer.Option(help="Where to look.")] = Scope.all,
    model: Annotated[Optional[str], typer.Option(help="The model config .json, when the index was built from one.")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="The index's weights file, moved or copied since build-index (its SHA-256 must match).")] = None,
    device: Annotated[Device, typer.Option(help="Where a text or new-image query is embedded.")] = Device.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    html: Annotated[Optional[Path], typer.Option(help="Also write an HTML page of the query and its neighbours as thumbnails.", dir_okay=False)] = None,
    index: IndexOpt = DEFAULT_INDEX,
):
    """The nearest images to an image or a text prompt (exact, cosine distance); an indexed query is left out."""
    import json
    from dataclasses import asdict

    from .inspect import NeighborsCfg, find_neighbors

    if html is not None:
        from .export import check_page_out

        check_page_out(html)
    r = find_neighbors(index, NeighborsCfg(query=query, text=text, k=k, split=split.value, model=model, device=device.value,
                                          pretrained=pretrained))
    if html is not None:
        from .gallery import write_neighbors

        write_neighbors(r, index, html)
    if as_json:
        hits = [{f: v for f, v in asdict(n).items() if f != "image"} for n in r.neighbors]
        typer.echo(json.dumps({"query": r.query, "neighbors": hits}, indent=1))
        return
    q = r.query
    typer.echo(f"query  {q['kind']}: " + "  ".join(str(q[f]) for f in ("id", "path", "text", "split") if q.get(f)))
    if not r.neighbors:
        typer.echo(f"  no embedded images in split {split.value}")
    else:
        w = max([2, *(len(n.id) for n in r.neighbors)])
        typer.echo(f"{'rank':>4}  {'distance':>8}  {'split':<9}  {'id':<{w}}  path")
    for n in r.neighbors:
        typer.echo(f"{n.rank:>4}  {n.distance:>8.4f}  {n.split:<9}  {n.id:<{w}}  {n.path or '-'}")
    if html is not None:
        typer.echo(f"page -> {html}")


@command
def duplicates(
    threshold: Annotated[Optional[float], typer.Option(help="Pairs closer than this cosine distance are near-duplicates; default 0.05.")] = None,
    split: Annotated[Scope, typer.Option(help="Which images to group.")] = Scope.all,
    out: Annotated[Path, typer.Option(help="CSV of group,id,path,split (groups largest first).", dir_okay=False)] = Path("duplicates.csv"),
    html: Annotated[Optional[Path], typer.Option(help="Also write an HTML page of the groups' thumbnails, largest first.", dir_okay=False)] = None,
    html_groups: Annotated[int, typer.Option(help="Groups shown on the HTML page (0: all).")] = 100,
    html_per_group: Annotated[int, typer.Option(help="Thumbnails shown per group on the HTML page.")] = 12,
    index: IndexOpt = DEFAULT_INDEX,
):
    """Groups of near-duplicates: connected components of close pairs, found exactly, block by block (bf16 screen + float32 recheck)."""
    from .export import check_out
    from .gallery import GalleryCfg
    from .inspect import DEFAULT_THRESHOLD, DuplicatesCfg
    from .inspect import duplicates as run

    check_out(out)  # and the library checks --html before the search
    t = DEFAULT_THRESHOLD if threshold is None else threshold
    bar = progress_bar("searching", unit="block")
    try:
        s = run(index, DuplicatesCfg(threshold=t, split=split.value), out, progress_factory=bar, html=html,
                gallery=GalleryCfg(groups=html_groups, per_group=html_per_group))
    finally:
        bar.close()
    typer.echo(f"{s['groups']} near-duplicate group(s) among {s['images']} images (cosine distance < {t}) -> {out}")
    typer.echo(f"  in groups        {s['in_groups']} images, largest group {s['largest']}")
    typer.echo(f"  unlabeled        {100 * s['pool_in_groups']:.1f}% of {s['pool']} unlabeled images are in groups "
               f"(excluded ones included)")
    if s["pool_represented"] is not None:
        typer.echo(f"  already labeled  {100 * s['pool_represented']:.1f}% of the {s['pool']} unlabeled images share a group "
                   f"with a labeled image")
    if html is not None:
        typer.echo(f"  page             {s['html_groups']} of {s['groups']} group(s) as thumbnails -> {html}")


@command
def report(
    selection: Annotated[Path, typer.Option("--selection", help="A selection file from select or export.", dir_okay=False)],
    out: Annotated[Path, typer.Option(help="The HTML file to write.", dir_okay=False)] = Path("report.html"),
    k: Annotated[int, typer.Option("--k", help="Nearest labeled images shown per pick.")] = 3,
    limit: Annotated[int, typer.Option("--limit", help="Picks shown in the table, best first (0: all); the plots use all.")] = 500,
    index: IndexOpt = DEFAULT_INDEX,
):
    """One self-contained HTML page: each pick with its scores and nearest labeled images, and plots."""
    from .export import check_page_out
    from .report import ReportCfg, build_report

    check_page_out(out)
    d = build_report(index, selection, out, ReportCfg(k=k, limit=limit))
    if d.counts["repeated"]:
        err(f"warning: {d.counts['repeated']} row(s) of {selection} repeat an earlier pick; each image is shown once, at its first rank")
    n = d.counts["picks"]
    part = f"; the table shows the first {limit}" if 0 < limit < n else ""
    source = "covering radius computed" if d.radius_source == "computed" else f"covering radius from {d.radius_source}"
    typer.echo(f"report on {n} picks ({source}{part}) -> {out}")


@command
def mark_labeled(
    list_file: Annotated[Optional[Path], typer.Argument(metavar="LIST", help="A text file of ids or paths, one a line.")] = None,
    selection: Annotated[Optional[Path], typer.Option("--selection", help="A selection file; ties the images to its select run.", dir_okay=False)] = None,
    undo: Annotated[bool, typer.Option("--undo", help="Move them back to unlabeled (only images mark-labeled moved).")] = False,
    index: IndexOpt = DEFAULT_INDEX,
):
    """Move images from unlabeled to labeled once they are labeled; the next select counts them as labeled."""
    from .labeling import mark_labeled as run

    r = run(index, list_file, selection, undo=undo)
    finished()
    if undo:
        typer.echo(f"moved {r.moved} image(s) back to unlabeled; {r.already} already were (run #{r.run})")
        if r.from_sources:
            err(f"warning: {r.from_sources} image(s) are labeled because a --labeled source lists them and stay labeled; "
                f"take them out of that source to change it")
        return
    by = f" from select run #{r.labeled_by}" if r.labeled_by else ""
    typer.echo(f"marked {r.moved} image(s) labeled{by}; {r.already} already were (run #{r.run})")
    if r.no_vector:
        err(f"warning: {r.no_vector} of them {'has' if r.no_vector == 1 else 'have'} no vector now (e.g. "
            f"{r.no_vector_example}): marked, but not a center of select until build-index embeds "
            f"{'it' if r.no_vector == 1 else 'them'} again")


@command
def exclude(
    list_file: Annotated[Optional[Path], typer.Argument(metavar="LIST", help="A text file of ids or paths, one a line.")] = None,
    selection: Annotated[Optional[Path], typer.Option("--selection", help="A selection file (e.g. the rows your labelers skipped).", dir_okay=False)] = None,
    reason: Annotated[Optional[str], typer.Option(help="Why, shown by info (e.g. 'blank', 'private').")] = None,
    undo: Annotated[bool, typer.Option("--undo", help="Make them candidates again.")] = False,
    index: IndexOpt = DEFAULT_INDEX,
):
    """Keep images out of every later selection: ones that cannot be labeled (blank, private, out of scope)."""
    from .labeling import exclude as run

    r = run(index, list_file, selection, reason=reason, undo=undo)
    finished()
    if undo:
        typer.echo(f"{r.changed} image(s) are candidates again; {r.already} were not excluded (run #{r.run})")
        return
    typer.echo(f"excluded {r.changed} image(s) from selection; {r.already} already were (run #{r.run})")
    if r.labeled:
        err(f"warning: {r.labeled} of them are labeled: they stay centers; the exclusion applies if they are moved "
            f"back to unlabeled")


@command
def export(
    out: Annotated[Path, typer.Option(help=".csv, .jsonl or .parquet; a Label Studio file is written beside it.", dir_okay=False)],
    run: Annotated[Optional[int], typer.Option("--run", min=1, max=(1 << 63) - 1, help="The select run to write (see `novelty info`).")] = None,
    latest: Annotated[bool, typer.Option("--latest", help="The latest select run.")] = False,
    label_studio_root: LabelStudioRootOpt = None,
    index: IndexOpt = DEFAULT_INDEX,
):
    """Write a recorded selection run again. Novelty and nearest-labeled are recomputed against the
    labeled set less the run's own picks; distance_at_pick is not stored and is left empty."""
    from .export import check_label_studio_root, check_selection_out, get_writer
    from .labeling import export_run

    if (run is None) != latest:
        raise ConfigError("give --run N or --latest (one of them)")
    get_writer(out)  # a bad extension or a missing pyarrow fails before any work
    check_selection_out(out)
    check_label_studio_root(label_studio_root)
    rid, n, ls, outside = export_run(index, run, out, label_studio_root)
    finished()
    _warn_outside(outside, label_studio_root)
    typer.echo(f"wrote {n} picks of select run #{rid} -> {out}, {ls}")


@command
def info(index: IndexOpt = DEFAULT_INDEX):
    """What the index holds: model, dim, counts per split, failures, size on disk."""
    from .labeling import excluded_by_reason
    from .store import SHARD_ADVICE, open_store

    with open_store(index) as store:
        m = store.manifest
        c = store.counts()
        enc = m.get("encoder", {})
        typer.echo(f"index      {index.resolve()}")
        if enc.get("kind") == "imported":
            typer.echo(f"model      vectors from import-embeddings (model {enc.get('model', '-')!r})")
        else:
            typer.echo(f"model      {enc.get('kind', '-')} {enc.get('model', '-')} (weights: {enc.get('pretrained', '-')})")
        typer.echo(f"dim        {m.get('dim', '-')}")
        for split in ("labeled", "unlabeled"):
            parts = {st: n for (sp, st), n in c["by_split_status"].items() if sp == split}
            typer.echo(f"{split:<10} {parts.get('embedded', 0)} embedded, {parts.get('failed', 0)} failed, {parts.get('pending', 0)} pending")
        if c["failed_by_reason"]:  # both splits': printed after the split lines, not as the unlabeled line's
            typer.echo("failed     " + ", ".join(f"{reason}: {n}" for reason, n in c["failed_by_reason"].items()))
        excluded = excluded_by_reason(store)
        if excluded:
            why = ", ".join(f"{r or 'no reason given'}: {n}" for r, n in excluded.items())
            typer.echo(f"excluded   {sum(excluded.values())} unlabeled image(s) kept out of selection ({why})")
        groups, images = store.duplicate_hashes()
        if groups:
            typer.echo(f"duplicates {images} byte-identical images in {groups} group(s)")
        damaged = store.shard_problems()
        for name, why in damaged.items():
            typer.echo(f"damaged    shard {name}: {why}")
        typer.echo(f"disk       {fmt_bytes(store.disk_bytes())}")
        for line in history_lines(store):
            typer.echo(line)
    if damaged:  # everything else was still shown; a script checking the index sees it fail, as other readers do
        raise IndexDamagedError(f"{len(damaged)} shard(s) missing or damaged; {SHARD_ADVICE}")


def history_lines(store) -> list[str]:
    rows = store.db.execute("SELECT id, kind, started FROM runs ORDER BY id DESC LIMIT 10").fetchall()
    if not rows:
        return []
    import time

    from .labeling import run_notes

    notes = run_notes(store, [r[0] for r in rows])
    out = ["history"]
    for rid, kind, started in reversed(rows):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(started))
        note = f"  {notes[rid]}" if notes.get(rid) else ""
        out.append(f"  #{rid:<4} {when}  {kind}{note}")
    return out


if __name__ == "__main__":
    app()
