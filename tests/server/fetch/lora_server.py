"""A LoRA file server on loopback, scripted per path, and the calls the fetch tests make."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from safetensors.numpy import save_file

from server.fetch.downloads import TransferLimits
from server.fetch.errors import LoraSourceError
from server.fetch.lora_fetcher import LocalLora, LoraFetcher, LoraPolicy

T = TypeVar("T")


@dataclass
class Route:
    """What the server does for one path."""

    body: bytes = b""
    status: int = 200
    delay: float = 0.0  # before the headers
    stall: float = 0.0  # after the headers, before the body
    drip: float = 0.0  # the body a byte at a time, this many seconds apart
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
                    if route.drip:
                        for i in range(len(route.body)):
                            self.wfile.write(route.body[i : i + 1])
                            self.wfile.flush()
                            time.sleep(route.drip)
                    else:
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

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


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
    """A fetcher's policy; keywords of TransferLimits go to its transfer limits."""
    limits = {name: kw.pop(name) for name in list(kw) if name in TransferLimits.__dataclass_fields__}
    limits = {"connect_timeout": 2, "read_timeout": 2, **limits}
    kw.setdefault("allow_private_addresses", True)  # the test server is on loopback
    return LoraPolicy(cache_dir=tmp_path / "cache", transfers=TransferLimits(**limits), **kw)


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
