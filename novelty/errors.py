"""Errors by kind. The CLI turns each into a one-line message and its exit code."""


class NoveltyError(Exception):
    """Base class: anything novelty raises on purpose."""

    exit_code = 1


class ConfigError(NoveltyError):
    """A bad argument or option value; the message names the value."""

    exit_code = 2


class SourceError(NoveltyError):
    """A missing or empty image source."""

    exit_code = 2


class IndexMissingError(NoveltyError):
    """No index at the given directory."""

    exit_code = 3


class IndexMismatchError(NoveltyError):
    """Vectors from another model or dimension than the index holds."""

    exit_code = 3


class EncoderError(NoveltyError):
    """The encoder could not be created (unknown model, weights unreachable)."""

    exit_code = 4


class ModelError(NoveltyError):
    """A detector/segmenter spec that cannot be loaded or used."""

    exit_code = 4


class IndexDamagedError(NoveltyError):
    """An index directory whose catalog, manifest, shards or FAISS file cannot be read."""

    exit_code = 3


class IndexReadOnlyError(NoveltyError):
    """An index directory that cannot be written (a read-only file system or folder)."""

    exit_code = 3


class IndexBusyError(NoveltyError):
    """Another process (or this one) holds the index's write lock: retry when it is done."""

    exit_code = 5


class InputError(NoveltyError):
    """A data file (vectors, ids, scores, selection) that is malformed."""

    exit_code = 2


class StorageError(NoveltyError):
    """The system refused a read or write the index needs (a full disk, an I/O error,
    no permission): nothing is wrong with the index itself."""

    exit_code = 6


class Terminated(KeyboardInterrupt):
    """SIGTERM, what a scheduler (slurm, Kubernetes) or `kill` sends: a stop like Ctrl-C,
    with the same clean-up and the same word on what was kept (the CLI installs it)."""


def first_line(e: BaseException, limit: int | None = None) -> str:
    """An exception as one line, 'Type: first line of its message', the message cut to
    `limit` characters when given."""
    text = (str(e).strip().splitlines() or [""])[0]
    if limit is not None and len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def reason_kind(reason: str) -> str:
    """A recorded failure reason's kind, the part before its first colon: 'decode error',
    'too large', 'missing', ... (`info` and the run summaries count failures by it)."""
    return reason.split(":", 1)[0]
