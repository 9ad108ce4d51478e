"""The kernel's on-disk cache: converted sources, exports and pass outputs.

Every entry is built in a temporary directory beside it
(``.tmp-NAME-TAG-pidPID``, locked by its builder for as long as it runs) and
renamed into place only once complete, with a manifest written last: every
file's size and SHA-256, and the inode, mtime and ctime it had once written.

An entry is verified before each use. One without a manifest, with a missing or
resized file (a killed conversion, a truncated copy) or with a file whose
content no longer matches its digest (a bit flip, an overwrite) is never loaded:
it is rebuilt, and the rebuild is logged as ``cache.corrupt_rebuilt`` with the
file and the reason. A file whose inode, mtime and ctime are still those of the
manifest is known unchanged without reading it (any write through the file
system moves its ctime); ``LLMK_CACHE_VERIFY=full`` re-reads every file on its
first use in each process, which also catches a medium that rots in place.
Entries written before manifests had digests are checked by size only.

A build killed mid-way leaves its temporary directory behind; those whose
builder is gone (nobody holds the lock and the process named in the name is
dead) are removed when a cache is opened and before a build of the same entry,
logged as ``cache.tmp_removed``. A live build's directory is never touched. A
build that runs out of disk space removes what it wrote and raises
``CacheFullError``, which names the cache and the space left.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmk.errors import LlmkError
from llmk.logs import get_logger

try:
    import fcntl
except ImportError:  # Windows: liveness is judged by the process id alone
    fcntl = None  # type: ignore[assignment]

log = get_logger("llmk.cache")

MANIFEST = "llmk-manifest.json"
DEFAULT_CACHE_DIR = "~/.cache/llmk"
#: Set to ``full`` to re-hash every file of an entry on its first use in a process.
VERIFY_ENV = "LLMK_CACHE_VERIFY"
TMP_PREFIX = ".tmp-"
#: A temporary directory nobody holds the lock of, whose process id still runs, is kept
#: this long (seconds): its builder may be between creating and locking it, or the id was reused.
PID_REUSE_AGE = 60.0
#: Temporary directories and files that name no process (older llmk versions) are removed
#: once this old (seconds) and unlocked.
UNOWNED_AGE = 15 * 60.0

_OWNER_PID = re.compile(r"[-.]pid(\d+)(?:\.tmp)?$")
_SPACE_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
_SPACE_MESSAGES = ("no space left on device", "disk quota exceeded", "os error 28")


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLMK_CACHE_DIR", DEFAULT_CACHE_DIR)).expanduser()


def key_digest(*parts: Any) -> str:
    """A short stable digest of JSON-serializable key parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


class CacheFullError(LlmkError):
    """A cache build ran out of disk space (or quota); what it had written was removed."""

    def __init__(self, root: Path, entry: str, what: str, free: int | None, total: int | None):
        from llmk.memory import format_size

        self.root, self.entry, self.what, self.free, self.total = root, entry, what, free, total
        building = f"{entry} ({what})" if what else entry
        space = (f"{format_size(free)} free of {format_size(total)} on its disk" if free is not None
                 else "its disk's free space is unknown")
        super().__init__(
            f"cache {root}: no space left on device while building {building}; {space}. The partial build "
            f"was removed: free some space ('llmk cache clear' removes every entry) or move the cache to a "
            f"larger disk (LLMK_CACHE_DIR, --cache-dir or the kernel's cache_dir)"
        )


@dataclass(frozen=True)
class Problem:
    """Why an entry may not be used: ``file`` (relative to the entry) and ``reason``."""

    file: str
    reason: str


class Cache:
    """A directory of atomically built, self-validating entries."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        try:
            self.sweep()
        except Exception as error:  # noqa: BLE001 - opening a cache never fails on its leftovers
            log.warning("cache.sweep_failed", root=str(self.root), error=repr(error))

    def entry_dir(self, kind: str, name: str) -> Path:
        return self.root / kind / name

    def build(self, kind: str, name: str, builder: Callable[[Path], Any], *, describe: str = "") -> Path:
        """Return the valid entry ``kind/name``, building it with ``builder(tmp_dir)`` if needed."""
        return self.get_or_build(kind, name, builder, describe=describe)[0]

    def get_or_build(self, kind: str, name: str, builder: Callable[[Path], Any], *,
                     describe: str = "") -> tuple[Path, bool]:
        """``build``, and whether this call built the entry (``False``: it was there, or
        another process built it meanwhile)."""
        final = self.entry_dir(kind, name)
        problem = None
        if final.is_dir():
            problem = self.verify(final)
            if problem is None:
                return final, False
        started = time.perf_counter()
        tmp = final.parent / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}-pid{os.getpid()}"
        lock: int | None = None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._sweep_dir(final.parent, f"{TMP_PREFIX}{name}-")  # a killed build of this very entry
            if problem is not None:
                if self.verify(final) is None:  # another process rebuilt it meanwhile
                    return final, False
                self._discard(final)
            tmp.mkdir()
            lock = _lock(tmp, block=True)
            log.info("cache.build_started", kind=kind, entry=name, what=describe)
            builder(tmp)
            _write_manifest(tmp)
            try:
                os.rename(tmp, final)
                built = True
            except OSError:
                if self.verify(final) is not None:  # another process won the race with a bad entry
                    raise
                built = False
        except BaseException as error:
            shutil.rmtree(tmp, ignore_errors=True)
            _unlock(lock)
            lock = None
            if isinstance(error, Exception):
                log.warning("cache.build_failed", kind=kind, entry=name, what=describe, error=repr(error),
                            **({"replacing": f"{problem.file}: {problem.reason}"} if problem else {}))
            if _out_of_space(error):
                raise self._full(f"{kind}/{name}", describe) from error
            raise
        finally:
            if tmp.exists():  # another process's entry won the rename
                shutil.rmtree(tmp, ignore_errors=True)
            _unlock(lock)
        seconds = round(time.perf_counter() - started, 2)
        if problem is not None:
            log.warning("cache.corrupt_rebuilt", artifact=f"{kind}/{name}", what=describe, path=str(final),
                        file=str(final / problem.file), reason=problem.reason, seconds=seconds)
        log.info("cache.build_finished", kind=kind, entry=name, seconds=seconds)
        return final, built

    @staticmethod
    def verify(path: Path, *, full: bool | None = None) -> Problem | None:
        """Why the entry at ``path`` may not be used, or None when it is whole.

        Sizes first (cheap), then content digests: a file whose inode, mtime and
        ctime are those the manifest recorded is known unchanged; any other is
        read and hashed (once per process and stat). ``full`` (default: the
        ``LLMK_CACHE_VERIFY=full`` environment) hashes every file regardless.
        """
        if full is None:
            full = os.environ.get(VERIFY_ENV, "").strip().lower() == "full"
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            files = manifest["files"]
            if not isinstance(files, dict):
                raise TypeError(f"'files' is a {type(files).__name__}")
        except FileNotFoundError:
            return Problem(MANIFEST, "no manifest: a build that never finished, or not a cache entry")
        except (OSError, ValueError, KeyError, TypeError) as error:
            return Problem(MANIFEST, f"unreadable manifest ({error!r})")
        stats: dict[str, os.stat_result] = {}
        for rel, size in files.items():
            try:
                stats[rel] = stat = (path / rel).stat()
            except OSError:
                return Problem(rel, "missing")
            if stat.st_size != size:
                change = "truncated" if stat.st_size < size else "grown"
                return Problem(rel, f"{change}: {stat.st_size} bytes, {size} when built")
        digests = manifest.get("sha256")
        recorded = manifest.get("stat") or {}
        if not isinstance(digests, dict):
            return None  # an entry from before digests: sizes are all there is to check
        for rel, expected in digests.items():
            stat = stats.get(rel)
            if stat is None:
                return Problem(rel, "in the digests but not among the files")
            if not full and recorded.get(rel) == [stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns]:
                continue
            try:
                actual = _content_digest(path / rel, stat)
            except OSError as error:
                return Problem(rel, f"unreadable ({error})")
            if actual != expected:
                return Problem(rel, f"content changed since it was built (sha256 {actual[:16]}, "
                                    f"built as {str(expected)[:16]}): a bit flip or an overwrite")
        return None

    @staticmethod
    def is_valid(path: Path) -> bool:
        return Cache.verify(path) is None

    def remove(self, path: Path) -> None:
        """Drop one entry (e.g. an artifact that failed its quality gate)."""
        shutil.rmtree(path, ignore_errors=True)
        log.info("cache.entry_removed", path=str(path))

    def entries(self) -> list[dict[str, Any]]:
        """Every entry: kind, name, size in bytes, and whether it is valid (builds in
        progress, in their temporary directories, are not entries)."""
        found = []
        if not self.root.is_dir():
            return found
        for kind_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for entry in sorted(p for p in kind_dir.iterdir() if p.is_dir() and not p.name.startswith(TMP_PREFIX)):
                size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
                found.append(
                    {"kind": kind_dir.name, "name": entry.name, "bytes": size, "valid": self.is_valid(entry),
                     "path": str(entry)}
                )
        return found

    def clear(self) -> int:
        """Remove every entry (and the leftovers of killed builds; a build still
        running keeps its directory); returns how many entries were removed."""
        entries = self.entries()
        for entry in entries:
            shutil.rmtree(entry["path"], ignore_errors=True)
        self.sweep()
        return len(entries)

    # -- leftovers of killed builds -----------------------------------------------------
    def sweep(self) -> list[Path]:
        """Remove the temporary directories (and digest-memo files) whose writer is
        gone; returns their paths. Each removal is logged as ``cache.tmp_removed``."""
        removed: list[Path] = []
        try:
            children = list(self.root.iterdir())
        except OSError:
            return removed
        for child in children:
            if child.name.startswith("digests.") and child.name.endswith(".tmp"):
                if _remove_orphan(child):
                    removed.append(child)
            elif child.is_dir() and not child.name.startswith("."):
                removed += self._sweep_dir(child, TMP_PREFIX)
        return removed

    def _sweep_dir(self, directory: Path, prefix: str) -> list[Path]:
        removed = []
        try:
            candidates = [p for p in directory.iterdir() if p.name.startswith(prefix)]
        except OSError:
            return removed
        for path in candidates:
            if path.is_dir() and _remove_orphan(path):
                removed.append(path)
        return removed

    def _discard(self, final: Path) -> None:
        """Take a bad entry out of its name at once (rename), then delete it."""
        trash = final.parent / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}-pid{os.getpid()}"
        try:
            os.rename(final, trash)
        except OSError:
            shutil.rmtree(final, ignore_errors=True)
            return
        lock = _lock(trash, block=True)
        try:
            shutil.rmtree(trash, ignore_errors=True)
        finally:
            _unlock(lock)

    def _full(self, entry: str, what: str) -> CacheFullError:
        try:
            usage = shutil.disk_usage(self.root)
            free, total = usage.free, usage.total
        except OSError:
            free = total = None
        return CacheFullError(self.root, entry, what, free, total)

    # Content digests of large files are memoized by (path, size, mtime) so that a
    # cached load does not re-hash hundreds of megabytes.
    def file_digest(self, path: Path) -> str:
        path = path.resolve()
        stat = path.stat()
        memo_path = self.root / "digests.json"
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
        key = str(path)
        hit = memo.get(key)
        if hit and hit.get("size") == stat.st_size and hit.get("mtime_ns") == stat.st_mtime_ns:
            return hit["sha256"]
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                sha.update(chunk)
        memo[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha.hexdigest()}
        tmp = memo_path.with_name(f"digests.{uuid.uuid4().hex[:8]}.pid{os.getpid()}.tmp")
        try:  # the memo only saves time: a full disk must not fail the load here
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(memo, indent=1))
            os.replace(tmp, memo_path)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            log.warning("cache.digest_memo_unsaved", path=str(memo_path), error=str(error))
        return sha.hexdigest()

    def dir_digest(self, path: Path) -> str:
        """Digest of a model directory: every file's relative name and content digest."""
        parts = []
        for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
            parts.append((str(file.relative_to(path)), self.file_digest(file)))
        return key_digest(parts)


def _write_manifest(path: Path) -> None:
    files: dict[str, int] = {}
    digests: dict[str, str] = {}
    stats: dict[str, list[int]] = {}
    for f in sorted(path.rglob("*")):
        if not f.is_file() or f.name == MANIFEST:  # a copied input's manifest is overwritten below
            continue
        rel = str(f.relative_to(path))
        stat = f.stat()
        files[rel] = stat.st_size
        digests[rel] = _content_digest(f, stat)
        stats[rel] = [stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns]
    (path / MANIFEST).write_text(json.dumps(
        {"files": files, "sha256": digests, "stat": stats, "created": time.time()}, indent=1))


# -- content digests, memoized per process by the file's stat ----------------------------

_digests: dict[tuple, str] = {}
_digests_lock = threading.Lock()


def _content_digest(path: Path, stat: os.stat_result) -> str:
    key = (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    with _digests_lock:
        hit = _digests.get(key)
    if hit is not None:
        return hit
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            sha.update(chunk)
    with _digests_lock:
        _digests[key] = sha.hexdigest()
    return sha.hexdigest()


# -- temporary directories: locks and owners ---------------------------------------------


def _lock(path: Path, *, block: bool) -> int | None:
    """An exclusive ``flock`` on the directory ``path`` (held until ``_unlock``; the
    kernel drops it when the process dies, however it dies). None when it is held
    by someone else (``block=False``) or locks are unavailable here."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _remove_orphan(path: Path) -> bool:
    """Remove the temporary directory or file ``path`` if its writer is gone, and log it.

    Gone: nobody holds the directory's lock and the process its name ends with
    (``-pidN``) is dead (or still runs after ``PID_REUSE_AGE``: the id was reused).
    A name without a process id is removed once ``UNOWNED_AGE`` old and unlocked.
    The lock is held while deleting, so no build can take the directory meanwhile.
    """
    match = _OWNER_PID.search(path.name)
    pid = int(match.group(1)) if match else None
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False
    is_dir = path.is_dir()
    lock = None
    if is_dir and fcntl is not None:
        lock = _lock(path, block=False)
        if lock is None:
            return False  # a live build holds it (or it just vanished)
    try:
        if pid is None:
            keep = age < UNOWNED_AGE
        elif not _process_alive(pid):
            keep = False
        elif lock is not None:
            keep = age < PID_REUSE_AGE  # unlocked yet its process runs: not locked *yet*, or a reused id
        else:
            keep = is_dir or age < UNOWNED_AGE  # no locks here; a memo file is written in milliseconds
        if keep:
            return False
        if is_dir:
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if path.exists():
            return False
    finally:
        _unlock(lock)
    log.warning("cache.tmp_removed", path=str(path), owner_pid=pid, age_s=round(age, 1),
                reason="left by a build that did not finish; its process is gone")
    return True


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # it exists, but is not ours to inspect
        return True


def _out_of_space(error: BaseException) -> bool:
    """Whether ``error`` (or what it was raised from) is a full disk or quota;
    libraries that write in native code report it only in their message."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _SPACE_ERRNOS:
            return True
        if any(text in str(current).lower() for text in _SPACE_MESSAGES):
            return True
        current = current.__cause__ or current.__context__
    return False
