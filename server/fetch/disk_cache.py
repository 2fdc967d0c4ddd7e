"""Downloaded LoRA files on disk: content-addressed blobs, an index from URL to blob, LRU eviction under a
byte budget that never removes a file a request still needs (pinned)."""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from server.fetch.safetensors_check import CheckedFile


class DiskCache:
    """One cache per folder (it owns `folder/tmp`). `hits`, `misses` and `evictions` feed the metrics."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._blobs = folder / "blobs"
        self._tmp = folder / "tmp"
        self._index_file = folder / "index.json"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        for stale in self._tmp.iterdir():  # partial downloads from a crashed run
            with contextlib.suppress(OSError):
                stale.unlink()
        self._index: dict[str, dict[str, Any]] = self._load_index()
        self._pins: dict[str, int] = {}

    def lookup(self, url: str) -> CheckedFile | None:
        """The blob a URL was downloaded to before, if it is still there (counted as a hit or a miss)."""
        entry = self._index.get(url)
        if entry is not None:
            blob = self._blobs / f"{entry['sha256']}.safetensors"
            with contextlib.suppress(OSError):
                if blob.stat().st_size == entry["size"]:
                    os.utime(blob)  # recently used
                    self.hits += 1
                    return CheckedFile(blob, str(entry["sha256"]), int(entry["size"]))
        self.misses += 1
        return None

    def partial_file(self) -> Path:
        """Where a download in progress is written."""
        return self._tmp / f"{uuid.uuid4().hex}.part"

    def add(self, url: str, partial: Path, sha256: str, size: int, etag: str | None) -> CheckedFile:
        """Move a complete, checked download into the cache and remember where the URL's content is."""
        blob = self._blobs / f"{sha256}.safetensors"
        if blob.exists():
            os.utime(blob)
            partial.unlink()
        else:
            os.replace(partial, blob)
        self._index[url] = {"sha256": sha256, "size": size, "etag": etag, "time": time.time()}
        self._save_index()
        return CheckedFile(blob, sha256, size)

    def pin(self, sha256: str, count: int = 1) -> None:
        self._pins[sha256] = self._pins.get(sha256, 0) + count

    def unpin(self, sha256: str) -> None:
        count = self._pins.get(sha256, 0) - 1
        if count > 0:
            self._pins[sha256] = count
        else:
            self._pins.pop(sha256, None)

    def evict(self) -> None:
        """Delete least recently used blobs until the cache fits, skipping pinned (in-use) ones."""
        blobs: list[tuple[float, int, Path]] = []
        for blob in self._blobs.glob("*.safetensors"):
            with contextlib.suppress(OSError):
                st = blob.stat()
                blobs.append((st.st_mtime, st.st_size, blob))
        total = sum(size for _, size, _ in blobs)
        if total <= self.max_bytes:
            return
        gone: set[str] = set()
        for _, size, blob in sorted(blobs, key=lambda b: b[0]):
            if total <= self.max_bytes:
                break
            sha = blob.name.removesuffix(".safetensors")
            if self._pins.get(sha, 0) > 0:
                continue
            with contextlib.suppress(FileNotFoundError):
                blob.unlink()
            total -= size
            gone.add(sha)
            self.evictions += 1
        if gone:
            self._index = {u: e for u, e in self._index.items() if e.get("sha256") not in gone}
            self._save_index()

    def _load_index(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self._index_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save_index(self) -> None:
        tmp = self._index_file.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(self._index, indent=1, sort_keys=True))
        os.replace(tmp, self._index_file)
