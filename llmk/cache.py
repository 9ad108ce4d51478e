"""The kernel's on-disk cache: converted sources, exports and pass outputs.

Every entry is built in a temporary directory and renamed into place only once
complete, with a manifest of its files and sizes written last. An entry without
a manifest, or whose files no longer match it (a killed conversion, a truncated
copy), is never loaded: it is removed and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmk.logs import get_logger

log = get_logger("llmk.cache")

MANIFEST = "llmk-manifest.json"
DEFAULT_CACHE_DIR = "~/.cache/llmk"


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLMK_CACHE_DIR", DEFAULT_CACHE_DIR)).expanduser()


def key_digest(*parts: Any) -> str:
    """A short stable digest of JSON-serializable key parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


class Cache:
    """A directory of atomically built, self-validating entries."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def entry_dir(self, kind: str, name: str) -> Path:
        return self.root / kind / name

    def build(self, kind: str, name: str, builder: Callable[[Path], Any], *, describe: str = "") -> Path:
        """Return the valid entry ``kind/name``, building it with ``builder(tmp_dir)`` if needed."""
        final = self.entry_dir(kind, name)
        if self.is_valid(final):
            return final
        if final.exists():
            log.warning("cache.entry_invalid", path=str(final), action="rebuild")
            shutil.rmtree(final, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        started = time.perf_counter()
        log.info("cache.build_started", kind=kind, entry=name, what=describe)
        try:
            builder(tmp)
            _write_manifest(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not self.is_valid(final):  # another process won the race with a bad entry
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("cache.build_finished", kind=kind, entry=name, seconds=round(time.perf_counter() - started, 2))
        return final

    @staticmethod
    def is_valid(path: Path) -> bool:
        manifest = path / MANIFEST
        try:
            files = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        for rel, size in files.items():
            try:
                if (path / rel).stat().st_size != size:
                    return False
            except OSError:
                return False
        return True

    def remove(self, path: Path) -> None:
        """Drop one entry (e.g. an artifact that failed its quality gate)."""
        shutil.rmtree(path, ignore_errors=True)
        log.info("cache.entry_removed", path=str(path))

    def entries(self) -> list[dict[str, Any]]:
        """Every entry: kind, name, size in bytes, and whether it is valid."""
        found = []
        if not self.root.is_dir():
            return found
        for kind_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for entry in sorted(p for p in kind_dir.iterdir() if p.is_dir()):
                size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
                found.append(
                    {"kind": kind_dir.name, "name": entry.name, "bytes": size, "valid": self.is_valid(entry),
                     "path": str(entry)}
                )
        return found

    def clear(self) -> int:
        """Remove every entry; returns how many were removed."""
        entries = self.entries()
        for entry in entries:
            shutil.rmtree(entry["path"], ignore_errors=True)
        return len(entries)

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
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(memo, indent=1))
        os.replace(tmp, memo_path)
        return sha.hexdigest()

    def dir_digest(self, path: Path) -> str:
        """Digest of a model directory: every file's relative name and content digest."""
        parts = []
        for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
            parts.append((str(file.relative_to(path)), self.file_digest(file)))
        return key_digest(parts)


def _write_manifest(path: Path) -> None:
    files = {
        str(f.relative_to(path)): f.stat().st_size
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != MANIFEST  # a copied input's manifest is overwritten below
    }
    (path / MANIFEST).write_text(json.dumps({"files": files, "created": time.time()}, indent=1))
