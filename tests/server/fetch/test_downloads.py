"""LoRA downloads over HTTP into the disk cache: hits, shared downloads, redirects, failures, budgets."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.fetch.lora_fetcher import LocalLora, LoraFetcher
from tests.server.fetch.lora_server import (
    LoraServer,
    Route,
    cache_files,
    fetch,
    fetch_error,
    lora_bytes,
    policy,
    run,
)


def test_download_then_disk_cache_hit(server: LoraServer, tmp_path: Path) -> None:
    data = lora_bytes(tmp_path, 1)
    url = server.serve("/a.safetensors", Route(data, headers={"ETag": '"v1"'}))
    pol = policy(tmp_path)
    fetcher = LoraFetcher(pol)
    (lora,) = fetch(fetcher, [url])
    sha = hashlib.sha256(data).hexdigest()
    assert lora == LocalLora(url, pol.cache_dir / "blobs" / f"{sha}.safetensors", sha, len(data))
    assert lora.file.read_bytes() == data
    assert (fetcher.cache.hits, fetcher.cache.misses, server.hits["/a.safetensors"]) == (0, 1, 1)

    (again,) = fetch(fetcher, [url])
    assert again == lora
    assert (fetcher.cache.hits, fetcher.cache.misses, server.hits["/a.safetensors"]) == (1, 1, 1)

    # the index is on disk: a new fetcher (a restarted server) is a hit too, without the network
    fresh = LoraFetcher(pol)
    assert fetch(fresh, [url]) == [lora]
    assert (fresh.cache.hits, fresh.cache.misses, server.hits["/a.safetensors"]) == (1, 0, 1)


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
    assert fetcher.cache.misses == 1


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
        (
            lambda t: Route(lora_bytes(t, 8), drip=0.05),
            {"min_rate": 1000, "rate_window": 0.3},
            "under the minimum",
        ),
        (lambda t: Route(lora_bytes(t, 9), drip=0.01), {"deadline": 0.5, "rate_window": 100}, "within 0.5 s"),
    ],
    ids=[
        "404",
        "500",
        "timeout",
        "oversize-header",
        "oversize-stream",
        "html",
        "truncated",
        "early-close",
        "slow-drip",
        "deadline",
    ],
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


def test_downloads_beyond_the_caps_wait_their_turn_rather_than_fail(
    server: LoraServer, tmp_path: Path
) -> None:
    same_host = [
        server.serve(f"/h{i}.safetensors", Route(lora_bytes(tmp_path, 50 + i), delay=0.3)) for i in range(3)
    ]
    other_host = server.serve("/o.safetensors", Route(lora_bytes(tmp_path, 60), delay=0.3)).replace(
        "127.0.0.1", "localhost"
    )
    start = time.monotonic()
    loras = fetch(LoraFetcher(policy(tmp_path, max_per_host=1)), [*same_host, other_host])
    took = time.monotonic() - start
    assert len({lora.sha256 for lora in loras}) == 4  # every one arrived
    assert took >= 0.9  # one at a time from 127.0.0.1 (three 0.3 s downloads) ...
    assert max(server.hits.values()) == 1
    start = time.monotonic()
    fetch(LoraFetcher(policy(tmp_path / "other", max_concurrent=1)), [other_host, same_host[0]])
    assert time.monotonic() - start >= 0.6  # ... and one at a time in all
