"""What a LoRA `path` names, by the rules fal users know, decided before anything is fetched.

A path is one of three things, tried in this order:

1. An `http://` / `https://` URL (any host; Hugging Face `resolve/` URLs are plain URLs). Other schemes
   (`file://`, `s3://` ...) are refused.
2. A local path: an absolute path, or a relative one that contains `..` or that exists under one of the
   configured LoRA folders. Its real path (symlinks followed) must lie inside one of the folders. So an
   `owner/repo` that also exists as a relative path under an allowed folder is the local file; one that
   does not exist there is a Hub repo id.
3. A Hugging Face repo id: `owner/repo` or `owner/repo/sub/file.safetensors` (see `hub.py`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx

from server.fetch import address_guard
from server.fetch.errors import LoraSourceError
from server.fetch.safetensors_check import is_pickle_name

_HF_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HF_ID = re.compile(rf"^(?P<repo>{_HF_NAME}/{_HF_NAME})(?:/(?P<file>[^\s]+))?$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PICKLE_REFUSED = "pickle files (.bin/.pt/.pth/.ckpt/.pkl) are refused; use a .safetensors file"


@dataclass(frozen=True)
class LoraSource:
    """A classified path. `key` names the source for sharing one fetch between requests: the URL, the
    real path, or `repo[/file]`."""

    kind: Literal["url", "local", "hf"]
    key: str
    repo: str = ""
    file: str = ""


class LoraPaths:
    """The rules above, for one server's LoRA folders and address policy."""

    def __init__(self, folders: tuple[Path, ...], allow_private_addresses: bool) -> None:
        self.folders = tuple(folder.resolve() for folder in folders)
        self.allow_private_addresses = allow_private_addresses

    def classify(self, index: int, path: str) -> LoraSource:
        """What entry `index` of `loras` names; no I/O beyond a stat of local candidates."""

        def err(why: str) -> LoraSourceError:
            return LoraSourceError(f"LoRA {index} ({path}): {why}", index)

        if not isinstance(path, str) or not path.strip():
            raise err("the path is empty")
        path = path.strip()
        if _SCHEME.match(path):
            return self._url(path, err)
        if is_pickle_name(path):
            raise err(_PICKLE_REFUSED)
        p = Path(path)
        if p.is_absolute() or ".." in p.parts or self._exists_in_folder(p):
            return LoraSource("local", str(self._resolve_local(p, err)))
        m = _HF_ID.match(path)
        if m is not None:
            file = m.group("file") or ""
            if file and not file.endswith(".safetensors"):
                raise err("a Hugging Face file path must name a .safetensors file")
            return LoraSource("hf", path, m.group("repo"), file)
        raise err("not a URL, not a Hugging Face repo id, and no such file in the LoRA folders")

    def _url(self, path: str, err: Callable[[str], LoraSourceError]) -> LoraSource:
        try:
            url = httpx.URL(path)
        except (httpx.InvalidURL, ValueError):
            raise err("the URL is malformed") from None
        if url.scheme not in ("http", "https"):
            raise err("only http:// and https:// URLs are supported")
        if not url.host:
            raise err("the URL has no host")
        if is_pickle_name(url.path):
            raise err(_PICKLE_REFUSED)
        ip = address_guard.literal_ip(url.host)
        if ip is not None and address_guard.is_forbidden(ip) and not self.allow_private_addresses:
            raise err(f"downloads from non-public address {ip} are not allowed")
        return LoraSource("url", path)

    def _exists_in_folder(self, rel: Path) -> bool:
        return any(os.path.lexists(folder / rel) for folder in self.folders)

    def _resolve_local(self, p: Path, err: Callable[[str], LoraSourceError]) -> Path:
        if not self.folders:
            raise err("local LoRA paths are not allowed (no LoRA folders are configured)")
        candidates = [p] if p.is_absolute() else [folder / p for folder in self.folders]
        for candidate in candidates:
            real = candidate.resolve(strict=False)
            if not any(_is_within(real, folder) for folder in self.folders):
                continue
            if real.is_file():
                return real
            if os.path.lexists(candidate):
                raise err("not a regular file")
        if all(not any(_is_within(c.resolve(strict=False), f) for f in self.folders) for c in candidates):
            raise err("the path is outside the allowed LoRA folders")
        raise err("no such file in the LoRA folders")


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents
