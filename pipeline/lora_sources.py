"""Getting a request's LoRA files onto local disk, safely, in the HTTP process.

A LoRA ``path`` is one of three things, tried in this order:

1. ``http://`` / ``https://`` URL (any host; Hugging Face ``resolve/`` URLs are plain URLs). Other schemes
   (``file://``, ``s3://`` ...) are refused.
2. A local path: an absolute path, or a relative one that contains ``..`` or that exists under one of
   ``LoraPolicy.folders``. Its real path (symlinks followed) must lie inside one of the folders. So an
   ``owner/repo`` that also exists as a relative path under an allowed folder is the local file; one that
   does not exist there is a Hub repo id.
3. A Hugging Face repo id: ``owner/repo`` (the repo must hold exactly one ``.safetensors`` file) or
   ``owner/repo/sub/file.safetensors``. Downloaded by huggingface_hub into its own cache (``HF_HOME``,
   ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` are honoured).

Only safetensors is accepted: pickle formats are refused by name before any network access, every file is
checked against the safetensors header layout, and nothing is ever unpickled. This module imports neither
torch nor FastAPI, so downloads happen in the HTTP process and the GPU never waits on the network.

SSRF: URL downloads connect only to public addresses, pinned to the address that was checked
(``pipeline.address_guard``); redirects are followed by hand (at most 5), each hop through the same check.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import re
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from pipeline import address_guard
from pipeline.address_guard import ForbiddenAddress, GuardedTransport

__all__ = [
    "PICKLE_SUFFIXES",
    "LocalLora",
    "LoraFetcher",
    "LoraPolicy",
    "LoraSourceError",
    "validate_safetensors",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_REDIRECTS = 5
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_CHUNK = 1024 * 1024
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
_HF_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HF_ID = re.compile(rf"^(?P<repo>{_HF_NAME}/{_HF_NAME})(?:/(?P<file>[^\s]+))?$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class LoraSourceError(Exception):
    """A LoRA entry cannot be fetched; ``index`` says which entry of ``loras`` (for ``loras.<i>.path``)."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.index = index


@dataclass(frozen=True)
class LoraPolicy:
    """What a request may fetch and where it is kept. Private addresses are off by default (SSRF)."""

    cache_dir: Path
    folders: tuple[Path, ...] = ()
    allow_private_addresses: bool = False
    max_total_bytes: int = 5 * 1024**3  # fal's cap, per request
    connect_timeout: float = 10
    read_timeout: float = 60
    cache_max_bytes: int = 50 * 1024**3


@dataclass(frozen=True)
class LocalLora:
    """A LoRA on local disk: ``file`` is a validated safetensors file whose content hashes to ``sha256``."""

    source: str
    file: Path
    sha256: str
    size: int


class _Failure(Exception):
    """A failure of a shared fetch, phrased without the entry prefix (each waiter adds its own)."""


# ---------------------------------------------------------------------------------------------- validation


def validate_safetensors(file: Path) -> None:
    """Check that ``file`` is a complete safetensors file without reading tensor data.

    The header must be a JSON object of tensors with known dtypes, shapes whose byte size matches their
    offsets, and offsets that tile the data section exactly up to the end of the file. That catches
    truncated downloads, HTML error pages and pickles. Raises ``_Failure``.
    """
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _Failure("the file is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > _MAX_HEADER_BYTES or 8 + n > size:
            raise _Failure("the file is not a safetensors file (bad header length, or truncated)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _Failure("the file is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise _Failure("the file is not a safetensors file (header is not a JSON object)")
    spans: list[tuple[int, int]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise _Failure("the safetensors metadata is malformed")
            continue
        spans.append(_tensor_span(name, info))
    if not spans:
        raise _Failure("the safetensors file holds no tensors")
    spans.sort()
    expected = 0
    for begin, end in spans:
        if begin != expected:
            raise _Failure("the safetensors tensors overlap or leave gaps")
        expected = end
    if 8 + n + expected != size:
        raise _Failure(
            f"the safetensors file is truncated or has trailing bytes "
            f"({size} bytes, the header says {8 + n + expected})"
        )


def _tensor_span(name: str, info: Any) -> tuple[int, int]:
    if not isinstance(info, dict):
        raise _Failure(f"tensor {name!r} has a malformed header entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _DTYPE_BITS:
        raise _Failure(f"tensor {name!r} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _Failure(f"tensor {name!r} has a malformed shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _Failure(f"tensor {name!r} has malformed data offsets")
    bits = math.prod(shape) * _DTYPE_BITS[dtype]
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        raise _Failure(f"tensor {name!r}: its shape and dtype do not match its byte size")
    return offsets[0], offsets[1]


def _sha256_file(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- classifying


@dataclass(frozen=True)
class _Spec:
    kind: Literal["url", "local", "hf"]
    key: str  # single-flight key: the URL, the real path, or repo[/file]
    repo: str = ""
    file: str = ""


def _pickle_name(name: str) -> bool:
    return name.lower().rstrip("/").endswith(PICKLE_SUFFIXES)


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@dataclass
class _Budget:
    """A request's running byte total; overflow cancels the request's tasks as soon as it happens."""

    limit: int
    charged: dict[str, int] = field(default_factory=dict)
    error: LoraSourceError | None = None
    tasks: list[asyncio.Task[LocalLora]] = field(default_factory=list)
    entries: dict[str, tuple[int, str]] = field(default_factory=dict)  # key -> (index, path)

    def charge(self, key: str, total_for_key: int) -> None:
        if self.error is not None or total_for_key <= self.charged.get(key, 0):
            return
        self.charged[key] = total_for_key
        if sum(self.charged.values()) > self.limit:
            self.fail(key)

    def would_exceed(self, key: str, size: int) -> bool:
        others = sum(v for k, v in self.charged.items() if k != key)
        return others + size > self.limit

    def fail(self, key: str) -> None:
        index, path = self.entries[key]
        self.error = LoraSourceError(
            f"LoRA {index} ({path}): the request's LoRAs together exceed the "
            f"{_human(self.limit)} limit on total LoRA size",
            index,
        )
        for task in self.tasks:
            task.cancel()


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.3g} {unit}"


@dataclass
class _Flight:
    task: asyncio.Task[_Result]
    budget_objs: list[_Budget] = field(default_factory=list)
    waiters: int = 0
    streamed: int = 0
    announced: int | None = None


@dataclass(frozen=True)
class _Result:
    file: Path
    sha256: str
    size: int


# ---------------------------------------------------------------------------------------------- fetcher


class LoraFetcher:
    """Fetches a request's LoRAs concurrently into a content-addressed, LRU-evicted disk cache.

    One fetcher per cache directory (it owns ``cache_dir/tmp``). Concurrent fetches of the same source share
    one download. Blobs returned by :meth:`fetch_all` stay pinned (never evicted) until :meth:`release`;
    :meth:`using` does both. Call :meth:`aclose` at shutdown.
    """

    def __init__(self, policy: LoraPolicy) -> None:
        self.policy = policy
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._folders = tuple(f.resolve() for f in policy.folders)
        self._blobs = policy.cache_dir / "blobs"
        self._tmp = policy.cache_dir / "tmp"
        self._index_file = policy.cache_dir / "index.json"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        for stale in self._tmp.iterdir():  # partial downloads from a crashed run
            with contextlib.suppress(OSError):
                stale.unlink()
        self._index: dict[str, dict[str, Any]] = self._load_index()
        self._flights: dict[str, _Flight] = {}
        self._pins: dict[str, int] = {}
        self._local_hashes: dict[tuple[str, int, int, int], str] = {}
        self._client: httpx.AsyncClient | None = None

    # -- public API

    async def fetch_all(self, paths: Sequence[str]) -> list[LocalLora]:
        """Fetch every entry concurrently; the first failure cancels the rest and is raised.

        The returned blobs are pinned against eviction until :meth:`release` is called with them.
        """
        budget = _Budget(self.policy.max_total_bytes)
        specs = [self._classify(i, p) for i, p in enumerate(paths)]
        for i, (spec, path) in enumerate(zip(specs, paths, strict=True)):
            budget.entries.setdefault(spec.key, (i, path))
        budget.tasks = [
            asyncio.create_task(self._fetch_one(i, p, s, budget))
            for i, (p, s) in enumerate(zip(paths, specs, strict=True))
        ]
        try:
            await asyncio.gather(*budget.tasks)
        except BaseException as exc:
            for task in budget.tasks:
                task.cancel()
            await asyncio.gather(*budget.tasks, return_exceptions=True)
            self.release(
                [t.result() for t in budget.tasks if t.done() and not t.cancelled() and not t.exception()]
            )
            if budget.error is not None and not isinstance(exc, LoraSourceError):
                raise budget.error from None
            raise
        loras = [t.result() for t in budget.tasks]
        self._evict()
        return loras

    def release(self, loras: Iterable[LocalLora]) -> None:
        """Unpin blobs so they may be evicted again (call once the worker has loaded them)."""
        for lora in loras:
            self._unpin(lora.sha256)
        self._evict()

    @contextlib.asynccontextmanager
    async def using(self, paths: Sequence[str]) -> AsyncIterator[list[LocalLora]]:
        """``fetch_all`` then ``release`` when the block ends."""
        loras = await self.fetch_all(paths)
        try:
            yield loras
        finally:
            self.release(loras)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- classification (no I/O beyond stat of local candidates)

    def _classify(self, index: int, path: str) -> _Spec:
        def err(why: str) -> LoraSourceError:
            return LoraSourceError(f"LoRA {index} ({path}): {why}", index)

        if not isinstance(path, str) or not path.strip():
            raise err("the path is empty")
        path = path.strip()
        if _SCHEME.match(path):
            try:
                url = httpx.URL(path)
            except (httpx.InvalidURL, ValueError):
                raise err("the URL is malformed") from None
            if url.scheme not in ("http", "https"):
                raise err("only http:// and https:// URLs are supported")
            if not url.host:
                raise err("the URL has no host")
            if _pickle_name(url.path):
                raise err("pickle files (.bin/.pt/.pth/.ckpt/.pkl) are refused; use a .safetensors file")
            ip = address_guard.literal_ip(url.host)
            if ip is not None and address_guard.is_forbidden(ip) and not self.policy.allow_private_addresses:
                raise err(f"downloads from non-public address {ip} are not allowed")
            return _Spec("url", path)
        if _pickle_name(path):
            raise err("pickle files (.bin/.pt/.pth/.ckpt/.pkl) are refused; use a .safetensors file")
        p = Path(path)
        if p.is_absolute() or ".." in p.parts or self._exists_in_folder(p):
            return _Spec("local", str(self._resolve_local(p, err)))
        m = _HF_ID.match(path)
        if m is not None:
            file = m.group("file") or ""
            if file and not file.endswith(".safetensors"):
                raise err("a Hugging Face file path must name a .safetensors file")
            return _Spec("hf", path, m.group("repo"), file)
        raise err("not a URL, not a Hugging Face repo id, and no such file in the LoRA folders")

    def _exists_in_folder(self, rel: Path) -> bool:
        return any(os.path.lexists(folder / rel) for folder in self._folders)

    def _resolve_local(self, p: Path, err: Callable[[str], LoraSourceError]) -> Path:
        if not self._folders:
            raise err("local LoRA paths are not allowed (no LoRA folders are configured)")
        candidates = [p] if p.is_absolute() else [folder / p for folder in self._folders]
        for candidate in candidates:
            real = candidate.resolve(strict=False)
            if not any(_is_within(real, folder) for folder in self._folders):
                continue
            if real.is_file():
                return real
            if os.path.lexists(candidate):
                raise err("not a regular file")
        if all(not any(_is_within(c.resolve(strict=False), f) for f in self._folders) for c in candidates):
            raise err("the path is outside the allowed LoRA folders")
        raise err("no such file in the LoRA folders")

    # -- single flight

    async def _fetch_one(self, index: int, path: str, spec: _Spec, budget: _Budget) -> LocalLora:
        flight = self._flights.get(spec.key)
        if flight is None:
            holder: list[_Flight] = []
            task = asyncio.create_task(self._run_flight(spec, holder))
            flight = _Flight(task)
            holder.append(flight)
            self._flights[spec.key] = flight
        flight.waiters += 1
        flight.budget_objs.append(budget)
        if flight.announced is not None and budget.would_exceed(spec.key, flight.announced):
            budget.fail(spec.key)
        budget.charge(spec.key, flight.streamed)
        got_result = False
        try:
            result = await asyncio.shield(flight.task)
            got_result = True
        except _Failure as exc:
            raise LoraSourceError(f"LoRA {index} ({path}): {exc}", index) from None
        finally:
            flight.waiters -= 1
            with contextlib.suppress(ValueError):
                flight.budget_objs.remove(budget)
            if not got_result:
                if flight.task.done():
                    if not flight.task.cancelled() and flight.task.exception() is None:
                        self._unpin(flight.task.result().sha256)  # this waiter's pin, never collected
                elif flight.waiters == 0:
                    flight.task.cancel()
                    await asyncio.wait({flight.task})
        budget.charge(spec.key, result.size)
        if budget.error is not None:
            self._unpin(result.sha256)
            raise budget.error
        return LocalLora(path, result.file, result.sha256, result.size)

    async def _run_flight(self, spec: _Spec, holder: list[_Flight]) -> _Result:
        flight = holder[0]
        try:
            if spec.kind == "url":
                result = await self._fetch_url(spec.key, flight)
            elif spec.kind == "local":
                result = await asyncio.to_thread(self._local, Path(spec.key))
            else:
                result = await asyncio.to_thread(self._hf, spec)
            # one pin per waiter, taken before any of them resumes, so no eviction can slip in between
            self._pins[result.sha256] = self._pins.get(result.sha256, 0) + flight.waiters
            return result
        finally:
            if self._flights.get(spec.key) is flight:
                del self._flights[spec.key]

    def _unpin(self, sha: str) -> None:
        count = self._pins.get(sha, 0) - 1
        if count > 0:
            self._pins[sha] = count
        else:
            self._pins.pop(sha, None)

    # -- local files

    def _local(self, real: Path) -> _Result:
        st = real.stat()
        if st.st_size > self.policy.max_total_bytes:
            raise _Failure(
                f"the file is {_human(st.st_size)}, over the {_human(self.policy.max_total_bytes)} limit"
            )
        validate_safetensors(real)
        key = (str(real), st.st_size, st.st_mtime_ns, st.st_ino)
        sha = self._local_hashes.get(key)
        if sha is None:
            sha = self._local_hashes[key] = _sha256_file(real)
        return _Result(real, sha, st.st_size)

    # -- Hugging Face

    def _hf(self, spec: _Spec) -> _Result:
        from huggingface_hub import HfApi, constants, errors, hf_hub_download, snapshot_download

        offline = constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
            "1",
            "ON",
            "YES",
            "TRUE",
        )
        limit = self.policy.max_total_bytes
        try:
            filename = spec.file
            size: int | None = None
            if offline:
                if not filename:
                    folder = Path(snapshot_download(spec.repo, local_files_only=True))
                    names = sorted(str(f.relative_to(folder)) for f in folder.rglob("*.safetensors"))
                    filename = self._single(names)
            else:
                api = HfApi()
                if filename:
                    infos = api.get_paths_info(spec.repo, [filename])
                    sizes = [i.size for i in infos if hasattr(i, "size") and i.path == filename]
                    if not sizes:
                        raise _Failure(f"the repo has no file {filename}")
                    size = int(sizes[0])
                else:
                    files = {
                        f.path: int(f.size)
                        for f in api.list_repo_tree(spec.repo, recursive=True)
                        if hasattr(f, "size")
                    }
                    filename = self._single(sorted(n for n in files if n.endswith(".safetensors")), files)
                    size = files[filename]
                if size > limit:
                    raise _Failure(f"the file is {_human(size)}, over the {_human(limit)} limit")
            local = Path(hf_hub_download(spec.repo, filename, local_files_only=offline))
        except _Failure:
            raise
        except (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError):
            if offline:
                raise _Failure(
                    "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set "
                    "so it cannot be downloaded"
                ) from None
            raise _Failure("the Hugging Face Hub cannot be reached and the file is not cached") from None
        except errors.GatedRepoError:
            raise _Failure("the repo is gated: accept its terms on huggingface.co and set HF_TOKEN") from None
        except errors.RepositoryNotFoundError:
            raise _Failure("no such Hugging Face repo (or it is private and HF_TOKEN is not set)") from None
        except errors.RevisionNotFoundError:
            raise _Failure("the repo has no such revision") from None
        except errors.EntryNotFoundError:
            raise _Failure(f"the repo has no file {spec.file}") from None
        except errors.HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "an error"
            raise _Failure(f"the Hugging Face Hub answered {status}") from None
        except errors.HFValidationError:
            raise _Failure("not a valid Hugging Face repo id") from None
        except Exception as exc:  # huggingface_hub raises its own HTTP client's errors (httpx2)
            raise _Failure(f"the Hugging Face download failed: {exc}") from None
        return self._local(local)

    def _single(self, names: list[str], files: dict[str, int] | None = None) -> str:
        if len(names) == 1:
            return names[0]
        if not names:
            pickles = [n for n in (files or {}) if _pickle_name(n)]
            extra = " (it has only pickle files, which are refused)" if pickles else ""
            raise _Failure(f"the repo has no .safetensors file{extra}")
        shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        raise _Failure(f"the repo has {len(names)} .safetensors files ({shown}); name one as owner/repo/file")

    # -- URLs

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            p = self.policy
            self._client = httpx.AsyncClient(
                transport=GuardedTransport(p.allow_private_addresses),
                timeout=httpx.Timeout(
                    connect=p.connect_timeout,
                    read=p.read_timeout,
                    write=p.read_timeout,
                    pool=p.connect_timeout,
                ),
                follow_redirects=False,
                trust_env=False,
                headers={"Accept-Encoding": "identity"},
            )
        return self._client

    async def _fetch_url(self, url: str, flight: _Flight) -> _Result:
        entry = self._index.get(url)
        if entry is not None:
            blob = self._blobs / f"{entry['sha256']}.safetensors"
            with contextlib.suppress(OSError):
                if blob.stat().st_size == entry["size"]:
                    os.utime(blob)
                    self.hits += 1
                    return _Result(blob, str(entry["sha256"]), int(entry["size"]))
        self.misses += 1
        p = self.policy
        try:
            current = httpx.URL(url)
            for _hop in range(MAX_REDIRECTS + 1):
                async with self._http().stream("GET", current) as resp:
                    if resp.status_code in _REDIRECT_CODES:
                        location = resp.headers.get("location")
                        if not location:
                            raise _Failure(f"the server answered {resp.status_code} without a Location")
                        current = current.join(location)
                        if current.scheme not in ("http", "https"):
                            raise _Failure(f"redirected to a non-http URL ({current.scheme}:)")
                        continue
                    if resp.status_code != 200:
                        raise _Failure(f"the server answered {resp.status_code}")
                    return await self._stream_to_cache(url, resp, flight)
            raise _Failure(f"too many redirects (more than {MAX_REDIRECTS})")
        except ForbiddenAddress as exc:
            raise _Failure(
                f"{exc.host} resolves to the non-public address {exc.address}, which is not allowed"
            ) from None
        except httpx.ConnectTimeout:
            raise _Failure(f"could not connect within {p.connect_timeout:g} s") from None
        except httpx.ReadTimeout:
            raise _Failure(f"the server sent nothing for {p.read_timeout:g} s (read timeout)") from None
        except httpx.TimeoutException:
            raise _Failure("the download timed out") from None
        except httpx.ConnectError as exc:
            raise _Failure(f"could not connect: {exc}") from None
        except httpx.RemoteProtocolError:
            raise _Failure("the connection closed before the whole file arrived") from None
        except httpx.HTTPError as exc:
            raise _Failure(f"the download failed: {exc}") from None

    async def _stream_to_cache(self, url: str, resp: httpx.Response, flight: _Flight) -> _Result:
        limit = self.policy.max_total_bytes
        length_header = resp.headers.get("content-length")
        if length_header is not None and length_header.isdigit():
            length = int(length_header)
            if length > limit:
                raise _Failure(f"the file is {_human(length)}, over the {_human(limit)} limit")
            flight.announced = length
            for budget in list(flight.budget_objs):
                if budget.would_exceed(url, length):
                    budget.fail(url)
        tmp = self._tmp / f"{uuid.uuid4().hex}.part"
        hasher = hashlib.sha256()
        total = 0
        try:
            with tmp.open("wb") as out:
                async for chunk in resp.aiter_raw(_CHUNK):
                    total += len(chunk)
                    if total > limit:
                        raise _Failure(f"the file is larger than the {_human(limit)} limit")
                    flight.streamed = total
                    for budget in list(flight.budget_objs):
                        budget.charge(url, total)
                    hasher.update(chunk)
                    out.write(chunk)
            validate_safetensors(tmp)
            sha = hasher.hexdigest()
            blob = self._blobs / f"{sha}.safetensors"
            if blob.exists():
                os.utime(blob)
                tmp.unlink()
            else:
                os.replace(tmp, blob)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._index[url] = {
            "sha256": sha,
            "size": total,
            "etag": resp.headers.get("etag"),
            "time": time.time(),
        }
        self._save_index()
        return _Result(blob, sha, total)

    # -- index and eviction

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

    def _evict(self) -> None:
        """Delete least recently used blobs until the cache fits, skipping pinned (in-use) ones."""
        blobs: list[tuple[float, int, Path]] = []
        for blob in self._blobs.glob("*.safetensors"):
            with contextlib.suppress(OSError):
                st = blob.stat()
                blobs.append((st.st_mtime, st.st_size, blob))
        total = sum(size for _, size, _ in blobs)
        if total <= self.policy.cache_max_bytes:
            return
        gone: set[str] = set()
        for _, size, blob in sorted(blobs, key=lambda b: b[0]):
            if total <= self.policy.cache_max_bytes:
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
