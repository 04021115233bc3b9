"""The cache directory, atomic writes and checked safetensors files.

Nothing is ever written in place: files are written to a temporary name in the same directory and
renamed over the target, so an interrupted run leaves either the old file or the new one, never half.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import filelock

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.state_dict import state_fingerprint

log = logging.getLogger(__name__)

#: Environment variable that overrides the default cache directory.
CACHE_ENV = "SURGERY_BOOK_CACHE"


class CorruptFileError(SurgeryBookError):
    """A cached file exists but cannot be read back (truncated, overwritten or from another version)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        super().__init__(
            f"{path} is corrupt ({reason})",
            "delete it, or run the command again to rebuild it",
        )


@contextlib.contextmanager
def exported_cache(cache_dir: str | os.PathLike[str] | None, *path_variables: str) -> Iterator[None]:
    """While inside, ``$SURGERY_BOOK_CACHE`` names ``cache_dir`` (if given, else its current value) as an absolute
    path for child processes such as the kernels papermill starts, and so does every variable named in
    ``path_variables`` that is set (``SURGERY_BOOK_PRESETS``): a kernel runs in another folder, where a relative
    path would name another cache. Restored after."""
    names = (CACHE_ENV, *path_variables)
    saved = {name: os.environ.get(name) for name in names}
    if cache_dir is not None:
        os.environ[CACHE_ENV] = str(cache_dir)
    for name in names:
        if os.environ.get(name, "").strip():  # a blank one means the default, and must stay blank
            os.environ[name] = os.path.abspath(os.path.expanduser(os.environ[name]))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory that holds generated data and trained models, created if missing.

    Resolution order: the ``cache_dir`` argument, then ``$SURGERY_BOOK_CACHE``, then the user's cache
    directory (``~/.cache/surgery-book`` on Linux).

    Raises:
        SurgeryBookError: if the directory cannot be created or written to.
    """
    if cache_dir is not None and not str(cache_dir).strip():  # Path("") would be the current folder
        raise SurgeryBookError("an empty cache directory", "pass a folder as cache_dir, or None for the default")
    if cache_dir is None:
        variable = os.environ.get(CACHE_ENV, "")
        cache_dir = variable if variable.strip() else None  # set but blank: as if unset, as ${VAR:-default} does
    if cache_dir is None:
        import platformdirs

        cache_dir = platformdirs.user_cache_dir("surgery-book", appauthor=False)
    root = Path(cache_dir).expanduser()
    fix = f"pass a writable directory with --cache-dir (or cache_dir=...), or set ${CACHE_ENV}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise SurgeryBookError(f"cache directory {root} is not writable ({exc.strerror})", fix) from None
    return root


#: A temporary untouched for this long belongs to a run that was killed (a live write keeps touching it).
STALE_TEMPORARY_S = 3600


def remove_stale_temporaries(target: Path, older_than_s: float = STALE_TEMPORARY_S) -> int:
    """Delete ``.<target name>.*.tmp`` files next to ``target`` not modified for ``older_than_s``; returns how many."""
    removed = 0
    now = time.time()
    for candidate in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        try:
            if now - candidate.stat().st_mtime > older_than_s:
                candidate.unlink()
                removed += 1
        except FileNotFoundError:
            pass  # another run removed or renamed it meanwhile
    return removed


def process_umask() -> int:
    """This process's file mode creation mask (Linux reports it in ``/proc``; elsewhere it is set and restored,
    the only portable way to read it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_if_created(path: Path, mode: int) -> None:
    """Give a temporary the permissions ``open`` or ``mkdir`` would have given the final file or folder
    (``mode`` less the umask). ``tempfile`` creates them private (0600, 0700), and a rename keeps that: in a
    cache shared by a group (umask 002), the next user could not read the models, merges and embeddings, and
    a collaborator could not read the outputs. A file system that refuses ``chmod`` keeps them private."""
    with contextlib.suppress(OSError):
        os.chmod(path, mode & ~process_umask())


def stem_files(stem: str | os.PathLike[str], suffixes: Iterable[str]) -> list[Path]:
    """``<stem><suffix>`` for each of ``suffixes`` (``".csv"``, ...): the suffix is added to the stem's name, so
    ``main_table_mini-v0.2`` gives ``main_table_mini-v0.2.csv`` where ``Path.with_suffix`` gave
    ``main_table_mini-v0.csv`` (and a preset ``mini-v0.3`` the same file). A stem given with one of ``suffixes``
    (``table.csv``) is taken without it."""
    stem, suffixes = Path(stem), list(suffixes)
    if stem.suffix in suffixes:
        stem = stem.with_suffix("")
    return [stem.with_name(stem.name + suffix) for suffix in suffixes]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``, on error delete it.

    Temporaries of ``path`` that a killed run left (``.<name>.<random>.tmp``, untouched for
    :data:`STALE_TEMPORARY_S`) are removed first; a concurrent writer's live temporary is younger.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _as_if_created(tmp_path, 0o666)  # after writing: a writer may replace the temporary (safetensors does)
        os.replace(tmp_path, target)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(target, exc) from None
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; on success swap it in for ``path`` (replacing a folder
    that was there), on error delete it, so ``path`` holds either the old complete folder or the new one.

    Raises:
        SurgeryBookError: ``path`` exists and is not a folder (a file, or a link).
    """
    target = Path(path)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise SurgeryBookError(
            f"{target} exists and is not a folder", f"pass another output folder, or remove {target}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):  # a killed run's; a live one is younger
        with contextlib.suppress(OSError):
            if now - stale.stat().st_mtime > STALE_TEMPORARY_S:
                shutil.rmtree(stale)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    _as_if_created(tmp, 0o777)
    try:
        yield tmp
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
            os.replace(target, old / target.name)  # out of the way first: rename cannot replace a non-empty folder
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:
                os.replace(old / target.name, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(target, exc) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _disk_full(target: Path, exc: BaseException) -> SurgeryBookError:
    return SurgeryBookError(
        f"cannot write {target}: the disk is full ({exc})",
        f"free space in {target.parent} or pass --cache-dir elsewhere, then run the same command again (finished files are kept)",
    )


def to_json(payload: Any, indent: int = 2) -> str:
    """Standard JSON (RFC 8259) text: a non-finite number (NaN, infinity) becomes ``null`` instead of Python's
    ``NaN``; paths become strings and numpy / torch scalars numbers."""

    def finite(value: Any) -> Any:
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    def plain(value: Any) -> Any:  # what json cannot encode itself
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
            return finite(value.item())
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    return json.dumps(finite(payload), indent=indent, allow_nan=False, default=plain)


def write_json(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read JSON written by :func:`write_json`; a file that does not parse raises :class:`CorruptFileError`."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, and integers beyond Python's 4,300-digit limit
        raise CorruptFileError(Path(path), f"invalid JSON: {str(exc)[:200]}") from None
    except RecursionError:  # a hostile file nested thousands of levels deep
        raise CorruptFileError(Path(path), "JSON nested too deeply") from None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: Metadata key of the content checksum every file written by :func:`save_tensors` carries.
CONTENT_KEY = "surgery_book.content"
#: Files whose content checksum this process already verified: (path, size, mtime) -> True.
_verified: set[tuple[str, int, int]] = set()


def save_tensors(
    tensors: Mapping[str, Any], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> str:
    """Save a flat mapping of torch tensors to safetensors atomically; returns the file's SHA-256.

    The metadata also records a checksum of the tensors themselves (names, shapes, dtypes, values), which
    :func:`load_tensors` verifies: every cache detects a changed byte, not only the ones with a manifest.
    """
    from safetensors.torch import save_file

    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(
                contiguous, str(tmp), metadata={**dict(metadata or {}), CONTENT_KEY: state_fingerprint(contiguous)}
            )
            _sort_header(tmp)
        except Exception as exc:  # safetensors reports I/O failures as its own SafetensorError
            if "No space left" in str(exc) or "StorageFull" in str(exc) or "QuotaExceeded" in str(exc):
                raise _disk_full(Path(path), exc) from None
            raise
        digest = sha256_file(tmp)
    return digest


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted, in place and at the same length.

    safetensors writes ``__metadata__`` in hash-map order, which changes from process to process, so two
    identical saves had different bytes (and SHA-256): the zoo then took a rebuilt but identical model for
    a changed one and rebuilt everything trained from it. Sorting makes equal tensors give equal files.
    """
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        raw = handle.read(length)
        header = json.loads(raw)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        # The same compact encoding safetensors uses, so the text has the same length; the padding stays.
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= length:
            handle.seek(8)
            handle.write(text.ljust(length, b" "))


def content_checksum(path: str | os.PathLike[str]) -> str | None:
    """The tensor checksum :func:`save_tensors` recorded in ``path``'s header (read without loading the tensors).

    Two files with equal checksums hold equal tensors, whatever their bytes: a zoo compares these, not
    file hashes, to decide whether a model's inputs changed. None for a file written by other tools.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(CONTENT_KEY)
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CorruptFileError(Path(path), f"unreadable safetensors file: {exc}") from None


#: A build waiting longer than this for another process's lock reports it (the lock is released on exit,
#: even on kill -9, because the operating system drops the process's file locks).
LOCK_NOTICE_S = 5.0


@contextlib.contextmanager
def entry_lock(path: str | os.PathLike[str], what: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the cache entry ``path`` (a file or directory) while building it.

    Two runs that share a cache and build the same entry take turns: the second waits, then finds the
    entry finished and reuses it, instead of both writing and one manifest describing the other's files.
    The lock is the file ``.<name>.lock`` next to the entry (never inside a folder the user named).
    """
    target = Path(os.path.abspath(path))  # "." or "x/..": the folder's own name, so the lock lands beside it
    if not target.name:  # the root has nothing beside it: its lock would be "/..lock", inside it
        raise SurgeryBookError(
            f"{path} is the file system's root, which cannot hold a cache entry", "pass a folder below the root"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    lock = filelock.FileLock(str(lock_path))
    try:
        lock.acquire(timeout=LOCK_NOTICE_S)
    except filelock.Timeout:
        log.warning("waiting for another run that is building %s", what or target)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def load_tensors(
    path: str | os.PathLike[str], expected_sha256: str | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Load a safetensors file as ``(tensors, metadata)``.

    Raises:
        CorruptFileError: if the file is truncated or unreadable, its SHA-256 differs from
            ``expected_sha256``, or its tensors differ from the checksum :func:`save_tensors` recorded.
    """
    from safetensors import safe_open

    path = Path(path)
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise CorruptFileError(path, "checksum differs from the manifest")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CorruptFileError(path, f"unreadable safetensors file: {exc}") from None
    recorded = metadata.pop(CONTENT_KEY, None)
    if recorded is not None:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        # Hash each file once per process, and not at all when its file SHA-256 was just checked against a manifest.
        if key not in _verified and expected_sha256 is None:
            if state_fingerprint(tensors) != recorded:
                raise CorruptFileError(path, "its tensors differ from the checksum recorded when it was written")
            _verified.add(key)
    return tensors, metadata


def config_hash(data: Any) -> str:
    """A short, stable hash of JSON-compatible ``data`` (dataclasses are converted first): it names caches."""

    def encode(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        return list(value)

    blob = json.dumps(
        encode(data) if dataclasses.is_dataclass(data) else data, sort_keys=True, separators=(",", ":"), default=encode
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def source_checksum(paths: Iterable[str | os.PathLike[str]]) -> str:
    """A short hash of source files' names and bytes, in sorted order: a cache key that includes it is not reused
    after an edit to the code that computed its entry."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


class TensorStore:
    """Tensors on disk, one safetensors file per key: a JSON-compatible mapping of everything that decides them.

    The file is named by the key's hash and records the key itself, so a file copied over another's name (or
    a hash collision) is never taken for it. Writes are atomic: two processes filling the same entry both
    write it whole and the last rename wins; a killed one leaves no half file. A damaged file is recomputed.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def path(self, key: Mapping[str, Any]) -> Path:
        """The file that holds ``key``'s tensors: ``<directory>/<config_hash(key)>.safetensors``."""
        return self.directory / f"{config_hash(dict(key))}.safetensors"

    def get(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """``key``'s tensors, or None when they were never stored (or their file is damaged or another key's)."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            tensors, metadata = load_tensors(path)
        except CorruptFileError as exc:
            log.warning("recomputing %s: %s", path, exc.problem)
            return None
        if metadata.get("key") != _key_text(key):
            log.warning("recomputing %s: it holds the tensors of another key", path)
            return None
        return tensors

    def put(self, key: Mapping[str, Any], tensors: Mapping[str, Any]) -> None:
        """Store ``tensors`` (CPU copies) as ``key``'s, replacing what was there."""
        self.directory.mkdir(parents=True, exist_ok=True)
        save_tensors(tensors, self.path(key), metadata={"key": _key_text(key)})


def _key_text(key: Mapping[str, Any]) -> str:
    return json.dumps(dict(key), sort_keys=True, separators=(",", ":"))
