"""The disk cache: least recently used files go first, never one a request still holds."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from server.fetch.lora_fetcher import LoraFetcher
from tests.server.fetch.lora_server import (
    LoraServer,
    Route,
    lora_bytes,
    policy,
    run,
)


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
            assert fetcher.cache.evictions == 1 and not blob_of("b").exists()
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
    assert fetcher.cache.evictions >= 3 and fetcher.cache.hits >= 1
