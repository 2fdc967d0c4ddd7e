"""SSRF: downloads reach only public addresses, checked at every connection and every redirect."""

from __future__ import annotations

import ipaddress
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import httpcore
import pytest

from server.fetch import address_guard
from server.fetch.lora_fetcher import LoraFetcher
from tests.server.fetch.lora_server import (
    LoraServer,
    Route,
    fetch,
    fetch_error,
    lora_bytes,
    policy,
)


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
