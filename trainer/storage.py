"""Where a run lives: a POSIX path every host mounts, or an object store URI.

A run directory (``--run-dir``, the recipe's ``run_dir``) is either a path on
a shared filesystem (NFS, Lustre, EFS, FSx) or a URI that ``pyarrow.fs``
understands (``s3://bucket/runs/x``, ``gs://...``, ``hdfs://...``), as Ray
Train's ``storage_path`` is. Credentials and endpoints come from the
environment each host already has (``AWS_*`` variables, instance roles,
``AWS_ENDPOINT_URL`` for an S3-compatible server).

Everything here takes a *location*: a local path or a URI, as a string.
Writes are atomic on both kinds: a POSIX file is written to a temporary name,
fsynced, renamed and its directory fsynced; an object store publishes an
object whole when its upload completes. Ranks never train against a URI
directly: they write into a local working directory (``work_dir``) and put
finished files into the store (``put_file``); readers download
(``download_dir``, ``local_model``), except token store shards, which ranks
read by byte range (``open_ranges``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from topology.errors import ConfigError

HF_POINTER = "hf"
"""A stage's HF model as users name it: a symlink (POSIX) or a one-line object (object store) naming the current ``hf-*`` version."""


def is_uri(loc: str | os.PathLike) -> bool:
    """A ``scheme://`` location other than ``file://`` (which is a plain path)."""
    scheme = urlsplit(str(loc)).scheme
    return len(scheme) > 1 and scheme != "file" and "://" in str(loc)


def normalize(loc: str | os.PathLike) -> str:
    """An absolute path, or the URI without a trailing slash."""
    text = str(loc)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if is_uri(text):
        if urlsplit(text).query:
            raise ConfigError(f"run directory {text!r} has URI options; give them in the environment "
                              "(AWS_REGION, AWS_ENDPOINT_URL, ...) and a plain URI such as s3://bucket/runs")
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


def join(loc: str | os.PathLike, *parts: str) -> str:
    """``loc/part/...`` for paths and URIs alike."""
    return "/".join([str(loc).rstrip("/"), *(p.strip("/") for p in parts)])


def parent(loc: str) -> str:
    return loc.rstrip("/").rsplit("/", 1)[0]


def name(loc: str) -> str:
    return loc.rstrip("/").rsplit("/", 1)[-1]


def local_path(loc: str | os.PathLike) -> Path | None:
    """The path of a POSIX location, None for a URI."""
    return None if is_uri(loc) else Path(str(loc).removeprefix("file://"))


@functools.lru_cache(maxsize=None)
def _filesystem(root: str):
    import pyarrow.fs as pafs

    scheme = urlsplit(root).scheme
    # Small objects go up in one PutObject instead of a multipart upload.
    uri = root + ("?allow_delayed_open=true" if scheme in ("s3", "s3a") else "")
    try:
        return pafs.FileSystem.from_uri(uri)[0]
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise ConfigError(f"cannot open storage {root!r} ({type(exc).__name__}: {exc}); use a path or a URI pyarrow.fs "
                          "supports (s3://, gs://, hdfs://) with credentials in the environment") from None


def _fs(loc: str):
    """(pyarrow filesystem, path inside it) of a URI."""
    parts = urlsplit(loc)
    return _filesystem(f"{parts.scheme}://{parts.netloc}"), (parts.netloc + parts.path).rstrip("/")


# ----------------------------------------------------------------- reading
def read_bytes(loc: str) -> bytes | None:
    """The file's bytes, None if it does not exist."""
    path = local_path(loc)
    if path is not None:
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
    fs, p = _fs(loc)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError):
        return None
    except OSError as exc:
        if _missing(fs, p):
            return None
        raise OSError(f"cannot read {loc}: {exc}") from None


def open_ranges(loc: str):
    """A ``pyarrow.NativeFile`` of a URI to read byte ranges from (``read_at``): one request per range."""
    fs, p = _fs(loc)
    try:
        return fs.open_input_file(p)
    except OSError as exc:
        raise OSError(f"cannot open {loc}: {exc}") from None


def _missing(fs, p: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(p).type != pafs.FileType.File


def kind(loc: str) -> str:
    """``file``, ``dir``, ``link`` (POSIX symlink) or ``missing``."""
    path = local_path(loc)
    if path is not None:
        return "link" if path.is_symlink() else "dir" if path.is_dir() else "file" if path.exists() else "missing"
    import pyarrow.fs as pafs

    fs, p = _fs(loc)
    t = fs.get_file_info(p).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(t, "missing")


def children(loc: str) -> list[str]:
    """Names directly under a directory (empty if it does not exist)."""
    path = local_path(loc)
    if path is not None:
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    import pyarrow.fs as pafs

    fs, p = _fs(loc)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def file_sizes(loc: str) -> dict[str, int]:
    """Relative path -> size of every file under a directory (empty if it does not exist)."""
    path = local_path(loc)
    if path is not None:
        if not path.is_dir():
            return {}
        return {str(f.relative_to(path)): f.stat().st_size for f in path.rglob("*") if f.is_file()}
    import pyarrow.fs as pafs

    fs, p = _fs(loc)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    return {i.path[len(p) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


# ----------------------------------------------------------------- writing
def write_bytes(loc: str, data: bytes | str) -> None:
    """Publish a whole file at ``loc`` at once (never half of one, even after a crash)."""
    data = data.encode() if isinstance(data, str) else data
    path = local_path(loc)
    if path is None:
        fs, p = _fs(loc)
        with fs.open_output_stream(p) as f:
            f.write(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def append_line(loc: str, line: str) -> None:
    """Add a line to a text file. On an object store this rewrites the object: one writer at a time."""
    path = local_path(loc)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line.rstrip("\n") + "\n")
        return
    write_bytes(loc, (read_bytes(loc) or b"") + line.rstrip("\n").encode() + b"\n")


def put_file(src: Path, loc: str) -> None:
    """Move a finished local file to ``loc``, durably.

    On POSIX the file is fsynced and renamed into place when both lie on one
    filesystem (a staged checkpoint shard costs no copy), else copied and
    fsynced. On an object store it is uploaded; the object appears whole.
    """
    path = local_path(loc)
    if path is None:
        fs, p = _fs(loc)
        with open(src, "rb") as f, fs.open_output_stream(p) as out:
            shutil.copyfileobj(f, out, 16 << 20)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fsync_file(src)
    try:
        os.replace(src, path)
    except OSError:  # another filesystem
        shutil.copyfile(src, path)
        fsync_file(path)
    fsync_dir(path.parent)


def put_dir(src: Path, loc: str) -> None:
    """``put_file`` for every file under ``src``."""
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        put_file(f, join(loc, str(f.relative_to(src))))


def remove(loc: str) -> None:
    """Delete a file or a whole directory; missing is fine."""
    path = local_path(loc)
    if path is not None:
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
        return
    fs, p = _fs(loc)
    t = kind(loc)
    if t == "dir":
        fs.delete_dir(p)
    elif t == "file":
        fs.delete_file(p)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checksum(path: Path) -> str:
    """CRC-32 of a file, as 8 hex digits (fast: checkpoints are gigabytes)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def checksum_bytes(data: bytes) -> str:
    return f"{zlib.crc32(data):08x}"


# --------------------------------------------------------- local copies
def work_dir(loc: str) -> Path:
    """Where ranks of this host write before putting files into ``loc``.

    A POSIX location is its own working directory. A URI gets a directory
    under this host's temporary directory, one per location, shared by the
    host's ranks.
    """
    path = local_path(loc)
    if path is not None:
        return path
    key = hashlib.blake2b(loc.encode(), digest_size=8).hexdigest()
    out = Path(os.environ.get("RINGLEADER_CACHE") or Path(tempfile.gettempdir()) / "ringleader") / f"{name(loc)}-{key}"
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def host_lock(path: Path) -> Iterator[None]:
    """One process of this host at a time (ranks of one host share downloads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def download_dir(loc: str, dest: Path) -> Path:
    """A complete local copy of the directory ``loc`` at ``dest`` (made once per host; ``loc`` itself if POSIX)."""
    path = local_path(loc)
    if path is not None:
        return path
    done = dest.with_name(dest.name + ".complete")
    with host_lock(dest.with_name(dest.name + ".lock")):
        if done.exists() and dest.is_dir():
            return dest
        shutil.rmtree(dest, ignore_errors=True)
        fs, p = _fs(loc)
        for rel in file_sizes(loc):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f"{p}/{rel}") as f, open(target, "wb") as out:
                shutil.copyfileobj(f, out, 16 << 20)
        done.write_text(loc)
    return dest


def resolve_hf(loc: str) -> str:
    """The location of the model a stage's ``hf`` names: the pointer followed, or ``loc`` itself."""
    if is_uri(loc) and kind(loc) == "file":
        version = (read_bytes(loc) or b"").decode().strip()
        if not version or "/" in version:
            raise OSError(f"model pointer {loc} is damaged ({version!r}); the stage's HF export did not finish")
        return join(parent(loc), version)
    return loc


def local_model(loc: str | None) -> str | None:
    """A local directory holding the model at ``loc`` (downloaded once per host for a URI); None stays None."""
    if loc is None or not is_uri(loc):
        return loc
    target = resolve_hf(loc)
    if kind(target) != "dir":
        raise ConfigError(f"model {loc} does not exist; an earlier stage must finish first, or give a model directory")
    return str(download_dir(target, work_dir(parent(target)) / name(target)))


def switch_pointer(stage_loc: str, version: str) -> None:
    """Point ``stage_loc/hf`` at ``stage_loc/version`` in one atomic step."""
    pointer = join(stage_loc, HF_POINTER)
    path = local_path(pointer)
    if path is None:
        write_bytes(pointer, version + "\n")
        return
    if path.is_dir() and not path.is_symlink():  # a directory left by an older layout
        shutil.rmtree(path)
    tmp = path.with_name(f".{HF_POINTER}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(version)
    os.replace(tmp, path)
    fsync_dir(path.parent)

