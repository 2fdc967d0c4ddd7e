"""Webhooks: signing and the JWKS, delivery, retries and the SSRF guard, against a real local receiver."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from server.webhooks import KEY_FILE_NAME, WebhookSender, WebhookSigner, webhook_payload


def fast(
    signer: WebhookSigner, *, allow_private: bool = True, attempts: int = 10, user_id: str = "local"
) -> WebhookSender:
    """A sender with tiny backoff, so retries take milliseconds."""
    return WebhookSender(
        signer,
        allow_private_addresses=allow_private,
        attempts=attempts,
        user_id=user_id,
        backoff_base=0.001,
        backoff_max=0.01,
        timeout=5.0,
    )


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST and answers ``fail_status`` to the first
    ``fail_first`` of them, then ``status``."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.status = 200
        self.fail_first = 0
        self.fail_status = 500
        self.headers: dict[str, str] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.requests.append(
                    Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
                failing = len(receiver.requests) <= receiver.fail_first
                self.send_response(receiver.fail_status if failing else receiver.status)
                for k, v in receiver.headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.httpd.shutdown()
    r.httpd.server_close()


@pytest.fixture
def signer(tmp_path: Path) -> WebhookSigner:
    return WebhookSigner(tmp_path / "keys")


def deliver(sender: WebhookSender, url: str, body: dict[str, Any], request_id: str = "req-1") -> bool:
    """Run one delivery to the end on a fresh loop, then close the sender."""

    async def main() -> bool:
        try:
            return await sender.deliver(url, request_id, body)
        finally:
            await sender.aclose()

    return asyncio.run(main())


def public_key(jwks: dict[str, Any]) -> Ed25519PublicKey:
    (key,) = jwks["keys"]
    assert (key["kty"], key["crv"], key["use"], key["alg"]) == ("OKP", "Ed25519", "sig", "EdDSA")
    x = key["x"]
    assert "=" not in x
    return Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(x + "=" * (-len(x) % 4)))


def verify(jwks: dict[str, Any], headers: dict[str, str], body: bytes) -> None:
    """Verify as a fal receiver does; raises InvalidSignature."""
    message = "\n".join(
        [
            headers["x-fal-webhook-request-id"],
            headers["x-fal-webhook-user-id"],
            headers["x-fal-webhook-timestamp"],
            hashlib.sha256(body).hexdigest(),
        ]
    ).encode()
    public_key(jwks).verify(bytes.fromhex(headers["x-fal-webhook-signature"]), message)


# -------------------------------------------------------------------------------------------------- signing


def test_key_persists_with_mode_0600(tmp_path: Path) -> None:
    first = WebhookSigner(tmp_path / "keys")
    second = WebhookSigner(tmp_path / "keys")
    assert first.jwks() == second.jwks()
    assert first.jwks()["keys"][0]["kid"]
    assert stat.S_IMODE((tmp_path / "keys" / KEY_FILE_NAME).stat().st_mode) == 0o600
    signature = second.sign("r", "u", 1, b"{}")
    verify(first.jwks(), {**_headers("r", "u", 1), "x-fal-webhook-signature": signature}, b"{}")
    assert WebhookSigner(tmp_path / "other").jwks() != first.jwks()


def _headers(request_id: str, user_id: str, timestamp: int) -> dict[str, str]:
    return {
        "x-fal-webhook-request-id": request_id,
        "x-fal-webhook-user-id": user_id,
        "x-fal-webhook-timestamp": str(timestamp),
    }


def test_payload_shape() -> None:
    assert webhook_payload("a", "b", True, {"images": []}, None) == {
        "request_id": "a",
        "gateway_request_id": "b",
        "status": "OK",
        "payload": {"images": []},
        "error": None,
    }
    error = webhook_payload("a", "a", False, {"detail": "boom"}, "boom")
    assert (error["status"], error["payload"], error["error"]) == ("ERROR", {"detail": "boom"}, "boom")


# ------------------------------------------------------------------------------------------------- delivery


def test_delivery_arrives_once_signed(receiver: Receiver, signer: WebhookSigner) -> None:
    sender = fast(signer, user_id="alice")
    body = webhook_payload("req-1", "req-1", True, {"images": [{"url": "http://x/é.png"}], "seed": 7}, None)
    before = int(time.time())
    assert deliver(sender, receiver.url("/hook?token=s3cret"), body) is True
    (got,) = receiver.requests
    assert got.path == "/hook?token=s3cret"
    assert json.loads(got.body) == body
    h = got.headers
    assert h["content-type"] == "application/json"
    assert h["x-fal-webhook-request-id"] == "req-1"
    assert h["x-fal-webhook-user-id"] == "alice"
    assert before <= int(h["x-fal-webhook-timestamp"]) <= int(time.time())
    verify(signer.jwks(), h, got.body)
    with pytest.raises(InvalidSignature):
        verify(signer.jwks(), h, got.body.replace(b"7", b"8"))
    with pytest.raises(InvalidSignature):
        verify(signer.jwks(), {**h, "x-fal-webhook-request-id": "req-2"}, got.body)
    assert (sender.delivered, sender.failed, sender.retries, sender.in_flight) == (1, 0, 0, 0)


@pytest.mark.parametrize("fail_status", [500, 503, 429])
def test_retries_then_succeeds(receiver: Receiver, signer: WebhookSigner, fail_status: int) -> None:
    receiver.fail_first, receiver.fail_status = 2, fail_status
    sender = fast(signer)
    assert deliver(sender, receiver.url(), webhook_payload("r", "r", True, {}, None), "r") is True
    assert len(receiver.requests) == 3
    assert len({r.body for r in receiver.requests}) == 1  # each try sends the same bytes, freshly signed
    for r in receiver.requests:
        verify(signer.jwks(), r.headers, r.body)
    assert (sender.delivered, sender.failed, sender.retries) == (1, 0, 2)


@pytest.mark.parametrize("status", [400, 404, 302])
def test_no_retry_on_client_errors_or_redirects(
    receiver: Receiver, signer: WebhookSigner, status: int
) -> None:
    receiver.status = status
    receiver.headers = {"location": receiver.url("/elsewhere")}
    sender = fast(signer)
    assert deliver(sender, receiver.url(), {"status": "OK"}) is False
    assert [r.path for r in receiver.requests] == ["/hook"]
    assert (sender.delivered, sender.failed, sender.retries) == (0, 1, 0)


def test_gives_up_after_attempts(receiver: Receiver, signer: WebhookSigner) -> None:
    receiver.fail_first = 100
    sender = fast(signer, attempts=3)
    assert deliver(sender, receiver.url(), {"status": "OK"}) is False
    assert len(receiver.requests) == 3
    assert (sender.delivered, sender.failed, sender.retries) == (0, 1, 2)


def test_connection_errors_are_retried(signer: WebhookSigner) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    sender = fast(signer, attempts=2)
    assert deliver(sender, f"http://127.0.0.1:{port}/x", {}) is False
    assert (sender.delivered, sender.failed, sender.retries) == (0, 1, 1)


def test_aclose_cancels_pending_deliveries(receiver: Receiver, signer: WebhookSigner) -> None:
    receiver.fail_first = 100
    sender = WebhookSender(signer, allow_private_addresses=True, backoff_base=60, backoff_max=60)

    async def main() -> None:
        task = sender.deliver(receiver.url(), "r", {})
        while not receiver.requests:
            await asyncio.sleep(0.01)
        assert sender.in_flight == 1
        await sender.aclose()
        assert task.cancelled()
        assert sender.in_flight == 0
        with pytest.raises(RuntimeError):
            sender.deliver(receiver.url(), "r", {})

    asyncio.run(main())
    assert len(receiver.requests) == 1


# ---------------------------------------------------------------------------------------------------- SSRF

REFUSED = [
    "http://127.0.0.1:9/x",
    "http://localhost/x",
    "http://api.localhost/x",
    "http://169.254.169.254/x",
    "http://10.0.0.1/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://0.0.0.0/",
]


@pytest.mark.parametrize("url", REFUSED)
def test_check_url_refuses_private_by_default(signer: WebhookSigner, url: str) -> None:
    sender = WebhookSender(signer, allow_private_addresses=False)
    assert sender.check_url(url) is not None
    assert WebhookSender(signer, allow_private_addresses=True).check_url(url) is None


@pytest.mark.parametrize("url", ["ftp://x/", "file:///etc/passwd", "http:///x", "not a url", "x" * 3000])
def test_check_url_refuses_bad_urls_even_when_private_allowed(signer: WebhookSigner, url: str) -> None:
    assert WebhookSender(signer, allow_private_addresses=True).check_url(url) is not None


def test_check_url_resolves_names(signer: WebhookSigner, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"public.example": "93.184.216.34", "internal.example": "10.1.2.3"}

    def fake(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in answers:
            raise socket.gaierror("no such host")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    sender = WebhookSender(signer, allow_private_addresses=False)
    assert sender.check_url("https://public.example/hook") is None
    assert sender.check_url("https://93.184.216.34/hook") is None
    assert "10.1.2.3" in (sender.check_url("https://internal.example/hook") or "")
    assert "cannot be resolved" in (sender.check_url("https://missing.example/hook") or "")
    assert asyncio.run(sender.check_url_async("https://internal.example/hook")) is not None


def test_delivery_refuses_private_address_at_connect(receiver: Receiver, signer: WebhookSigner) -> None:
    sender = fast(signer, allow_private=False)
    assert deliver(sender, receiver.url(), {}) is False
    assert receiver.requests == []
    assert (sender.failed, sender.retries) == (1, 0)


def test_delivery_is_pinned_against_dns_rebinding(
    receiver: Receiver, signer: WebhookSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that passed the submit check but now resolves to loopback is refused at connect time."""
    real = anyio.getaddrinfo

    async def rebound(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        return await real("127.0.0.1" if host == "hooks.example" else host, port, *args, **kwargs)

    monkeypatch.setattr(anyio, "getaddrinfo", rebound)
    sender = fast(signer, allow_private=False)
    assert deliver(sender, f"http://hooks.example:{receiver.port}/hook", {}) is False
    assert receiver.requests == []
    assert (sender.delivered, sender.failed) == (0, 1)


# --- through the queue: `?fal_webhook=` on submit ------------------------------------------------------


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_submit_with_webhook_delivers_the_outcome(tmp_path: Path, receiver: Receiver) -> None:
    from tests.server.conftest import _harness

    gen = _harness(tmp_path, hold=False, allow_private_webhook_urls=True)
    h = next(gen)
    try:
        body = {"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": 4}
        ok = h.client.post(
            "/queue/fal-ai/flux-2/lora", params={"fal_webhook": receiver.url()}, json=body
        ).json()
        bad = h.client.post(
            "/queue/fal-ai/flux-2/lora", params={"fal_webhook": receiver.url()}, json={"prompt": ""}
        )
        wait_for(lambda: len(receiver.requests) == 2)
        by_id = {json.loads(r.body)["request_id"]: r for r in receiver.requests}
        delivered = json.loads(by_id[ok["request_id"]].body)
        assert delivered["status"] == "OK" and delivered["error"] is None
        assert delivered["payload"] == h.client.get(ok["response_url"]).json()
        failed = json.loads(by_id[bad.json()["request_id"]].body)
        assert failed["status"] == "ERROR" and failed["payload"]["detail"][0]["loc"] == ["body", "prompt"]
        jwks = h.client.get("/.well-known/jwks.json").json()
        for request in receiver.requests:
            verify(jwks, request.headers, request.body)
    finally:
        gen.close()


def test_submit_refuses_a_forbidden_webhook(tmp_path: Path) -> None:
    from tests.server.conftest import _harness

    gen = _harness(tmp_path, hold=False)
    h = next(gen)
    try:
        body = {"prompt": "a lighthouse"}
        for url in ("http://127.0.0.1:9/hook", "http://169.254.169.254/latest", "ftp://example.com/x"):
            refused = h.client.post("/queue/fal-ai/flux-2/lora", params={"fal_webhook": url}, json=body)
            assert refused.status_code == 400, url
            assert "fal_webhook refused" in refused.json()["detail"]
    finally:
        gen.close()


def test_a_webhook_cut_off_by_shutdown_is_sent_after_the_restart(tmp_path: Path, receiver: Receiver) -> None:
    from tests.server.conftest import _harness

    body = {"prompt": "a lighthouse", "image_size": "square", "num_inference_steps": 4}
    receiver.fail_first, receiver.fail_status = 10**6, 503  # the receiver is down: the sender waits to retry
    first = _harness(tmp_path, hold=False, allow_private_webhook_urls=True)
    h = next(first)
    accepted = h.client.post(
        "/queue/fal-ai/flux-2/lora", params={"fal_webhook": receiver.url()}, json=body
    ).json()
    wait_for(lambda: len(receiver.requests) == 1)
    first.close()  # shutdown cancels the retry

    receiver.fail_first, receiver.requests = 0, []  # the receiver is back
    for restart in range(2):
        gen = _harness(tmp_path, hold=False, allow_private_webhook_urls=True)
        next(gen)
        try:
            wait_for(lambda: len(receiver.requests) == 1)
            time.sleep(0.3)  # no second copy: once delivered, the store stops asking for it
            assert len(receiver.requests) == 1, restart
        finally:
            gen.close()
    delivered = json.loads(receiver.requests[0].body)
    assert (delivered["request_id"], delivered["status"]) == (accepted["request_id"], "OK")
