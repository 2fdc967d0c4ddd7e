"""LoRA sources: downloads, the disk cache, SSRF guards, local folders and the Hub, all offline.

LoRA files are served by a real HTTP server on 127.0.0.1 whose handler each test scripts per path.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpcore
import numpy as np
import pytest
from safetensors.numpy import save_file

from pipeline import address_guard
from pipeline.lora_sources import LocalLora, LoraFetcher, LoraPolicy, LoraSourceError

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ helpers


@dataclass
class Route:
    """What the server does for one path."""

    body: bytes = b""
    status: int = 200
    delay: float = 0.0  # before the headers
    stall: float = 0.0  # after the headers, before the body
    length: int | None = -1  # -1: the true length; None: no Content-Length (close-delimited)
    location: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


class LoraServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                server.hits[path] += 1
                route = server.routes.get(path, Route(status=404))
                try:
                    time.sleep(route.delay)
                    self.send_response(route.status)
                    if route.location is not None:
                        self.send_header("Location", route.location)
                    for k, v in route.headers.items():
                        self.send_header(k, v)
                    if route.length is None:
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    else:
                        n = len(route.body) if route.length == -1 else route.length
                        self.send_header("Content-Length", str(n))
                    self.end_headers()
                    self.wfile.flush()
                    time.sleep(route.stall)
                    self.wfile.write(route.body)
                    if route.length is not None and route.length > len(route.body):
                        self.close_connection = True
                except OSError:
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return self.url(path)


@pytest.fixture
def server() -> Iterator[LoraServer]:
    s = LoraServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def lora_bytes(tmp_path: Path, seed: int, n: int = 16) -> bytes:
    """A small valid safetensors file, distinct per seed."""
    file = tmp_path / f"gen-{seed}-{n}.safetensors"
    rng = np.random.default_rng(seed)
    save_file(
        {
            "transformer.x.lora_A.weight": rng.standard_normal((4, n)).astype(np.float32),
            "transformer.x.lora_B.weight": rng.standard_normal((n, 4)).astype(np.float32),
        },
        str(file),
    )
    return file.read_bytes()


def policy(tmp_path: Path, **kw: Any) -> LoraPolicy:
    kw.setdefault("allow_private_addresses", True)  # the test server is on loopback
    kw.setdefault("connect_timeout", 2)
    kw.setdefault("read_timeout", 2)
    return LoraPolicy(cache_dir=tmp_path / "cache", **kw)


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


def fetch(fetcher: LoraFetcher, paths: list[str]) -> list[LocalLora]:
    async def go() -> list[LocalLora]:
        try:
            return await fetcher.fetch_all(paths)
        finally:
            await fetcher.aclose()

    return run(go)


def fetch_error(fetcher: LoraFetcher, paths: list[str]) -> LoraSourceError:
    with pytest.raises(LoraSourceError) as info:
        fetch(fetcher, paths)
    return info.value


def cache_files(pol: LoraPolicy) -> list[Path]:
    return sorted(p for p in pol.cache_dir.rglob("*") if p.is_file() and p.name != "index.json")


# ------------------------------------------------------------------------------------------ URL downloads


def test_download_then_disk_cache_hit(server: LoraServer, tmp_path: Path) -> None:
    data = lora_bytes(tmp_path, 1)
    url = server.serve("/a.safetensors", Route(data, headers={"ETag": '"v1"'}))
    pol = policy(tmp_path)
    fetcher = LoraFetcher(pol)
    (lora,) = fetch(fetcher, [url])
    sha = hashlib.sha256(data).hexdigest()
    assert lora == LocalLora(url, pol.cache_dir / "blobs" / f"{sha}.safetensors", sha, len(data))
    assert lora.file.read_bytes() == data
    assert (fetcher.hits, fetcher.misses, server.hits["/a.safetensors"]) == (0, 1, 1)

    (again,) = fetch(fetcher, [url])
    assert again == lora
    assert (fetcher.hits, fetcher.misses, server.hits["/a.safetensors"]) == (1, 1, 1)

    # the index is on disk: a new fetcher (a restarted server) is a hit too, without the network
    fresh = LoraFetcher(pol)
    assert fetch(fresh, [url]) == [lora]
    assert (fresh.hits, fresh.misses, server.hits["/a.safetensors"]) == (1, 0, 1)


def test_same_url_twice_at_once_is_downloaded_once(server: LoraServer, tmp_path: Path) -> None:
    data = lora_bytes(tmp_path, 2)
    url = server.serve("/slow.safetensors", Route(data, delay=0.3))
    fetcher = LoraFetcher(policy(tmp_path))

    async def both() -> tuple[list[LocalLora], list[LocalLora]]:
        try:
            return await asyncio.gather(fetcher.fetch_all([url]), fetcher.fetch_all([url]))
        finally:
            await fetcher.aclose()

    a, b = run(both)
    assert a == b and a[0].sha256 == hashlib.sha256(data).hexdigest()
    assert server.hits["/slow.safetensors"] == 1
    assert fetcher.misses == 1


def test_entries_download_concurrently(server: LoraServer, tmp_path: Path) -> None:
    urls = [
        server.serve(f"/c{i}.safetensors", Route(lora_bytes(tmp_path, 10 + i), delay=0.4)) for i in range(3)
    ]
    start = time.monotonic()
    loras = fetch(LoraFetcher(policy(tmp_path)), urls)
    assert time.monotonic() - start < 1.0  # three 0.4 s downloads in parallel, not in series
    assert [lo.source for lo in loras] == urls and len({lo.sha256 for lo in loras}) == 3


def test_redirects_are_followed(server: LoraServer, tmp_path: Path) -> None:
    data = lora_bytes(tmp_path, 3)
    server.serve("/real.safetensors", Route(data))
    url = server.serve("/r.safetensors", Route(status=302, location="/real.safetensors"))
    (lora,) = fetch(LoraFetcher(policy(tmp_path)), [url])
    assert lora.sha256 == hashlib.sha256(data).hexdigest()


def test_redirect_loop_is_refused(server: LoraServer, tmp_path: Path) -> None:
    url = server.serve("/loop.safetensors", Route(status=301, location="/loop.safetensors"))
    err = fetch_error(LoraFetcher(policy(tmp_path)), [url])
    assert "too many redirects" in err.message and server.hits["/loop.safetensors"] == 6


def _truncated(tmp_path: Path) -> bytes:
    return lora_bytes(tmp_path, 4)[:-10]


@pytest.mark.parametrize(
    ("route", "limits", "expected"),
    [
        (lambda t: Route(status=404), {}, "the server answered 404"),
        (lambda t: Route(status=500), {}, "the server answered 500"),
        (lambda t: Route(lora_bytes(t, 5), stall=3), {"read_timeout": 0.3}, "read timeout"),
        (lambda t: Route(b"x", length=10 * 1024**3), {}, "over the 5 GiB limit"),
        (lambda t: Route(b"\0" * 50_000, length=None), {"max_total_bytes": 20_000}, "larger than the"),
        (lambda t: Route(b"<html>Not here</html>" * 10), {}, "not a safetensors file"),
        (lambda t: Route(_truncated(t)), {}, "truncated"),
        (lambda t: Route(lora_bytes(t, 6)[:100], length=5000), {}, "closed before the whole file"),
    ],
    ids=["404", "500", "timeout", "oversize-header", "oversize-stream", "html", "truncated", "early-close"],
)
def test_download_failures_name_the_entry_and_leave_nothing(
    server: LoraServer,
    tmp_path: Path,
    route: Callable[[Path], Route],
    limits: dict[str, Any],
    expected: str,
) -> None:
    good = server.serve("/good.safetensors", Route(lora_bytes(tmp_path, 7)))
    bad = server.serve("/bad.safetensors", route(tmp_path))
    pol = policy(tmp_path, **limits)
    start = time.monotonic()
    err = fetch_error(LoraFetcher(pol), [good, bad] if not limits else [bad])
    assert time.monotonic() - start < 2.5
    index = 0 if limits else 1
    assert err.index == index
    assert err.message.startswith(f"LoRA {index} ({bad}): "), err.message
    assert expected in err.message, err.message
    leftovers = [p for p in cache_files(pol) if p.read_bytes() != server.routes["/good.safetensors"].body]
    assert leftovers == []
    assert not any((pol.cache_dir / "tmp").iterdir())


def test_request_total_is_capped_across_entries(server: LoraServer, tmp_path: Path) -> None:
    a, b = lora_bytes(tmp_path, 8, n=256), lora_bytes(tmp_path, 9, n=256)
    urls = [server.serve("/a.safetensors", Route(a)), server.serve("/b.safetensors", Route(b))]
    err = fetch_error(LoraFetcher(policy(tmp_path, max_total_bytes=len(a) + len(b) // 2)), urls)
    assert err.index in (0, 1) and "together exceed" in err.message
    # each alone fits
    assert len(fetch(LoraFetcher(policy(tmp_path, max_total_bytes=len(a) + 10)), urls[:1])) == 1


# ------------------------------------------------------------------------------------------------- SSRF


def test_loopback_refused_by_default(server: LoraServer, tmp_path: Path) -> None:
    url = server.serve("/a.safetensors", Route(lora_bytes(tmp_path, 1)))
    err = fetch_error(LoraFetcher(policy(tmp_path, allow_private_addresses=False)), [url])
    assert err.index == 0 and "127.0.0.1" in err.message and "not allowed" in err.message
    # a name that resolves to loopback is refused at connect time, before any byte is sent
    by_name = f"http://localhost:{server.port}/a.safetensors"
    err = fetch_error(LoraFetcher(policy(tmp_path, allow_private_addresses=False)), [by_name])
    assert "localhost resolves to the non-public address" in err.message
    assert server.hits["/a.safetensors"] == 0
    # allowed when the operator says so
    assert len(fetch(LoraFetcher(policy(tmp_path, allow_private_addresses=True)), [by_name])) == 1


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "10.0.0.1",
        "192.168.1.1",
        "[::1]",
        "0.0.0.0",
        "[::ffff:127.0.0.1]",
        "100.64.0.1",
        "[fe80::1]",
    ],
)
def test_private_ip_literals_refused(tmp_path: Path, host: str) -> None:
    url = f"http://{host}/latest/lora.safetensors"
    start = time.monotonic()
    err = fetch_error(LoraFetcher(policy(tmp_path, allow_private_addresses=False)), [url])
    assert time.monotonic() - start < 1  # refused without trying to connect
    assert err.index == 0 and url in err.message and "not allowed" in err.message


def test_every_resolved_address_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    async def fake_getaddrinfo(host: str, port: int, **kw: Any) -> list[Any]:
        calls.append(host)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port)),
        ]

    async def no_connect(*args: Any, **kw: Any) -> Any:
        calls.append(f"connect {args[1:3]}")
        raise httpcore.ConnectError("the test forbids real connections")

    monkeypatch.setattr(anyio, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", no_connect)
    err = fetch_error(
        LoraFetcher(policy(tmp_path, allow_private_addresses=False)), ["https://mixed.example/x.safetensors"]
    )
    assert calls == ["mixed.example"] and "10.1.2.3" in err.message


def test_redirect_to_forbidden_address_refused(
    server: LoraServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = address_guard.is_forbidden

    def forbidden(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        # the test server's own address counts as public; everything else keeps the real rule
        return False if ip == ipaddress.ip_address("127.0.0.1") else real(ip)

    monkeypatch.setattr(address_guard, "is_forbidden", forbidden)
    target = "http://169.254.169.254/latest/meta-data/x.safetensors"
    url = server.serve("/r.safetensors", Route(status=302, location=target))
    start = time.monotonic()
    err = fetch_error(LoraFetcher(policy(tmp_path, allow_private_addresses=False)), [url])
    assert time.monotonic() - start < 1
    assert server.hits["/r.safetensors"] == 1
    assert "169.254.169.254" in err.message and "not allowed" in err.message


def test_malformed_url_refused(tmp_path: Path) -> None:
    err = fetch_error(LoraFetcher(policy(tmp_path)), ["http://[::1/x.safetensors"])
    assert err.index == 0 and "malformed" in err.message


@pytest.mark.parametrize(
    "scheme", ["file:///etc/passwd", "ftp://example.com/x.safetensors", "s3://b/x.safetensors"]
)
def test_other_schemes_refused(tmp_path: Path, scheme: str) -> None:
    assert "only http:// and https://" in fetch_error(LoraFetcher(policy(tmp_path)), [scheme]).message


# ----------------------------------------------------------------------------------------------- pickles


@pytest.mark.parametrize("ext", [".bin", ".pt", ".pth", ".ckpt", ".pkl", ".PT"])
def test_pickles_refused_by_name_without_any_request(server: LoraServer, tmp_path: Path, ext: str) -> None:
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / f"x{ext}").write_bytes(b"not even read")
    pol = policy(tmp_path, folders=(folder,))
    for i, path in enumerate(
        [server.url(f"/x{ext}"), server.url(f"/x{ext}?download=1"), f"owner/repo/x{ext}", f"x{ext}"]
    ):
        err = fetch_error(LoraFetcher(pol), [lora_sources_path_ok(tmp_path)] * i + [path])
        assert err.index == i and "pickle" in err.message and path in err.message
    assert sum(server.hits.values()) == 0


def lora_sources_path_ok(tmp_path: Path) -> str:
    """A valid local entry to put before the failing one, so the index is checked."""
    file = tmp_path / "loras" / "ok.safetensors"
    file.write_bytes(lora_bytes(tmp_path, 99))
    return "ok.safetensors"


# ------------------------------------------------------------------------------------------- local paths


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    inside, outside = tmp_path / "loras", tmp_path / "elsewhere"
    (inside / "sub").mkdir(parents=True)
    outside.mkdir()
    (inside / "sub" / "style.safetensors").write_bytes(lora_bytes(tmp_path, 20))
    (outside / "secret.safetensors").write_bytes(lora_bytes(tmp_path, 21))
    (inside / "link.safetensors").symlink_to(outside / "secret.safetensors")
    (inside / "notes.safetensors").write_text("not a tensor file")
    return inside, outside


def test_local_path_inside_folder(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    inside, _ = folders
    pol = policy(tmp_path, folders=(inside,))
    file = inside / "sub" / "style.safetensors"
    for path in ["sub/style.safetensors", str(file), "sub/../sub/style.safetensors"]:
        (lora,) = fetch(LoraFetcher(pol), [path])
        assert lora.file == file.resolve() and lora.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
        assert lora.source == path and lora.size == file.stat().st_size
    assert cache_files(pol) == []  # local files are used in place, not copied


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("OUTSIDE/secret.safetensors", "outside the allowed LoRA folders"),
        ("../elsewhere/secret.safetensors", "outside the allowed LoRA folders"),
        ("sub/../../elsewhere/secret.safetensors", "outside the allowed LoRA folders"),
        ("link.safetensors", "outside the allowed LoRA folders"),
        ("/etc/passwd", "outside the allowed LoRA folders"),
        ("missing.safetensors", "not a URL, not a Hugging Face repo id"),
        ("INSIDE/missing.safetensors", "no such file"),
        ("notes.safetensors", "not a safetensors file"),
        ("INSIDE/sub", "not a regular file"),
    ],
)
def test_local_paths_refused(tmp_path: Path, folders: tuple[Path, Path], path: str, expected: str) -> None:
    inside, outside = folders
    path = path.replace("OUTSIDE", str(outside)).replace("INSIDE", str(inside))
    err = fetch_error(LoraFetcher(policy(tmp_path, folders=(inside,))), [path])
    assert err.index == 0 and path in err.message and expected in err.message, err.message


def test_local_paths_need_a_configured_folder(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    inside, _ = folders
    err = fetch_error(LoraFetcher(policy(tmp_path)), [str(inside / "sub" / "style.safetensors")])
    assert "no LoRA folders are configured" in err.message


def test_local_file_shadows_repo_id_only_inside_folder(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    inside, _ = folders
    (inside / "owner").mkdir()
    (inside / "owner" / "repo").write_bytes(lora_bytes(tmp_path, 22))
    (lora,) = fetch(LoraFetcher(policy(tmp_path, folders=(inside,))), ["owner/repo"])
    assert lora.file == (inside / "owner" / "repo").resolve()


# --------------------------------------------------------------------------------------------- eviction


def test_lru_eviction_spares_recent_and_pinned(server: LoraServer, tmp_path: Path) -> None:
    blobs = {name: lora_bytes(tmp_path, 30 + i) for i, name in enumerate("abcd")}
    urls = {name: server.serve(f"/{name}.safetensors", Route(data)) for name, data in blobs.items()}
    size = len(blobs["a"])
    pol = policy(tmp_path, cache_max_bytes=int(size * 2.5))
    fetcher = LoraFetcher(pol)

    def blob_of(name: str) -> Path:
        return pol.cache_dir / "blobs" / f"{hashlib.sha256(blobs[name]).hexdigest()}.safetensors"

    async def scenario() -> None:
        try:
            for name in "ab":
                fetcher.release(await fetcher.fetch_all([urls[name]]))
                time.sleep(0.01)
            fetcher.release(await fetcher.fetch_all([urls["a"]]))  # a is now more recent than b
            time.sleep(0.01)
            fetcher.release(await fetcher.fetch_all([urls["c"]]))
            assert fetcher.evictions == 1 and not blob_of("b").exists()
            assert blob_of("a").exists() and blob_of("c").exists()
            fetcher.release(await fetcher.fetch_all([urls["b"]]))  # gone from the index too: a miss
            assert server.hits["/b.safetensors"] == 2

            # pinned blobs survive even when the cache is over budget
            held = await fetcher.fetch_all([urls["a"], urls["c"], urls["d"]])
            assert all(blob_of(n).exists() for n in "acd")
            fetcher.release(held)
            assert sum(blob_of(n).exists() for n in "abcd") == 2
        finally:
            await fetcher.aclose()

    run(scenario)
    assert fetcher.evictions >= 3 and fetcher.hits >= 1


# -------------------------------------------------------------------------------------------- Hugging Face


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    hub = tmp_path / "hf-hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    return hub


def _cache_repo(hub: Path, repo: str, files: dict[str, bytes]) -> None:
    """Lay out a repo in the Hub cache the way huggingface_hub does (refs/main -> snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = hub / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, data in files.items():
        target = root / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def test_hub_repo_offline_and_not_cached_is_a_clear_error(tmp_path: Path, offline_hub: Path) -> None:
    for path in ["nobody-here/no-such-lora", "nobody-here/no-such-lora/sub/x.safetensors"]:
        start = time.monotonic()
        err = fetch_error(LoraFetcher(policy(tmp_path)), [path])
        assert time.monotonic() - start < 2
        assert err.index == 0 and path in err.message and "HF_HUB_OFFLINE" in err.message, err.message


def test_hub_repo_from_the_offline_cache(tmp_path: Path, offline_hub: Path) -> None:
    one, two = lora_bytes(tmp_path, 40), lora_bytes(tmp_path, 41)
    _cache_repo(offline_hub, "someone/one-lora", {"lora.safetensors": one, "README.md": b"hi"})
    _cache_repo(offline_hub, "someone/two-loras", {"a.safetensors": one, "sub/b.safetensors": two})
    (lora,) = fetch(LoraFetcher(policy(tmp_path)), ["someone/one-lora"])
    assert lora.sha256 == hashlib.sha256(one).hexdigest() and lora.file.name == "lora.safetensors"
    err = fetch_error(LoraFetcher(policy(tmp_path)), ["someone/two-loras"])
    assert "2 .safetensors files" in err.message and "sub/b.safetensors" in err.message
    (picked,) = fetch(LoraFetcher(policy(tmp_path)), ["someone/two-loras/sub/b.safetensors"])
    assert picked.sha256 == hashlib.sha256(two).hexdigest()


def test_hub_file_must_be_safetensors(tmp_path: Path, offline_hub: Path) -> None:
    err = fetch_error(LoraFetcher(policy(tmp_path)), ["someone/repo/readme.md"])
    assert "must name a .safetensors file" in err.message
