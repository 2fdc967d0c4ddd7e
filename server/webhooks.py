"""fal-compatible completion webhooks: signed, retried, and guarded against SSRF.

A queue submit may carry ``?fal_webhook=URL``; when the request completes, the server POSTs fal's body
(``webhook_payload``) to that URL. Like fal, each POST is signed with Ed25519 over
``"{request_id}\\n{user_id}\\n{timestamp}\\n{sha256_hex(body)}"`` and carries the ``x-fal-webhook-*``
headers, so receivers written for fal (which fetch the public keys as a JWKS) verify ours unchanged once
pointed at this server's ``/.well-known/jwks.json``.

The URL is chosen by the client, so it is an SSRF vector: it is checked at submit time (``check_url``)
and again at every connection, through ``server.fetch.address_guard``'s guarded transport, which connects
only to the address it checked (no DNS rebinding), ignores environment proxies, and here follows no
redirects.
This module imports neither torch nor FastAPI.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import socket
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.fetch.address_guard import ForbiddenAddress, GuardedTransport, is_forbidden, literal_ip

__all__ = ["KEY_FILE_NAME", "WebhookSender", "WebhookSigner", "webhook_payload"]

log = logging.getLogger(__name__)

KEY_FILE_NAME = "webhook-ed25519.pem"
MAX_URL_LENGTH = 2048
_USER_AGENT = "flux2-lora-server-webhook/1"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class WebhookSigner:
    """The server's webhook signing key, kept in ``folder`` so receivers' pinned keys survive restarts.

    The key file is created once, readable by the owner only (0600), and written under a temporary name
    then hard-linked into place, so two processes starting together agree on one key and nobody ever
    reads a half-written file.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / KEY_FILE_NAME
        self._key = self._load_or_create()
        raw = self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self._x = _b64url(raw)
        # RFC 7638 thumbprint: a stable id that changes only when the key does.
        canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": self._x}, separators=(",", ":"))
        self.kid = _b64url(hashlib.sha256(canonical.encode()).digest())

    def _load_or_create(self) -> Ed25519PrivateKey:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(pem)
                    f.flush()
                    os.fsync(f.fileno())
                with contextlib.suppress(FileExistsError):  # another process won the race: use its key
                    os.link(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
        mode = stat.S_IMODE(self.path.stat().st_mode)
        if mode & 0o077:
            log.warning("webhook key %s had mode %o; setting it to 0600", self.path, mode)
            os.chmod(self.path, 0o600)
        loaded = serialization.load_pem_private_key(self.path.read_bytes(), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ValueError(f"{self.path} does not hold an Ed25519 private key")
        return loaded

    @staticmethod
    def message(request_id: str, user_id: str, timestamp: int, body: bytes) -> bytes:
        """The exact bytes fal signs; receivers rebuild them from the headers and the raw body."""
        return f"{request_id}\n{user_id}\n{timestamp}\n{hashlib.sha256(body).hexdigest()}".encode()

    def sign(self, request_id: str, user_id: str, timestamp: int, body: bytes) -> str:
        """Hex Ed25519 signature, as in fal's ``x-fal-webhook-signature`` header."""
        return self._key.sign(self.message(request_id, user_id, timestamp, body)).hex()

    def jwks(self) -> dict[str, Any]:
        """The public key as a JWKS, for ``/.well-known/jwks.json`` (receivers verify with any listed key)."""
        return {
            "keys": [
                {"kty": "OKP", "crv": "Ed25519", "x": self._x, "kid": self.kid, "use": "sig", "alg": "EdDSA"}
            ]
        }


def webhook_payload(
    request_id: str, gateway_request_id: str, ok: bool, payload: object, error: str | None
) -> dict[str, Any]:
    """fal's webhook body; on failure ``payload`` is the error body the result URL answers with."""
    return {
        "request_id": request_id,
        "gateway_request_id": gateway_request_id,
        "status": "OK" if ok else "ERROR",
        "payload": payload,
        "error": error,
    }


class _Permanent(Exception):
    """A delivery failure that retrying cannot fix (refused address, 4xx, redirect, bad URL)."""


class _Transient(Exception):
    """A delivery failure worth retrying; ``retry_after`` is the receiver's own hint, if it gave one."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # the HTTP-date form is rare for webhooks; our own backoff applies
    return seconds if seconds >= 0 else None


def _where(url: str) -> str:
    """The URL without path or query for logs: webhook URLs often carry secret tokens."""
    try:
        u = httpx.URL(url)
    except httpx.InvalidURL:
        return "<invalid URL>"
    return f"{u.scheme}://{u.netloc.decode('ascii', 'replace')}"


class WebhookSender:
    """Delivers webhooks in background tasks, retrying like fal (15 s timeout, up to 10 tries).

    Retries, with exponential backoff and jitter, cover connection errors, timeouts, 5xx and 429; other
    answers are final. Counters ``delivered``, ``failed`` (gave up) and ``retries`` feed metrics.
    """

    def __init__(
        self,
        signer: WebhookSigner,
        *,
        allow_private_addresses: bool,
        timeout: float = 15.0,
        attempts: int = 10,
        backoff_base: float = 2.0,
        backoff_max: float = 900.0,
        user_id: str = "local",
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.signer = signer
        self.allow_private_addresses = allow_private_addresses
        self.timeout = timeout
        self.attempts = attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.user_id = user_id
        self.delivered = 0
        self.failed = 0
        self.retries = 0
        self._tasks: set[asyncio.Task[bool]] = set()
        self._client: httpx.AsyncClient | None = None
        self._closed = False

    # -- checking

    def check_url(self, url: str, *, resolve: bool = True) -> str | None:
        """Why ``url`` must be refused at submit time, or None when it is acceptable.

        With ``resolve`` the host is looked up (blocking: call it through ``asyncio.to_thread`` from async
        code) and refused if any address is non-public, or if it does not resolve, so a typo fails the
        submit instead of silently losing the webhook. Delivery checks again at connect time regardless.
        """
        if len(url) > MAX_URL_LENGTH:
            return f"the webhook URL is longer than {MAX_URL_LENGTH} characters"
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            return f"the webhook URL is not valid: {exc}"
        if parsed.scheme not in ("http", "https"):
            return "the webhook URL must be http:// or https://"
        host = parsed.host
        if not host:
            return "the webhook URL has no host"
        if self.allow_private_addresses:
            return None
        refused = f"the webhook host {host} is a non-public address, which is not allowed"
        ip = literal_ip(host)
        if ip is not None:
            return refused if is_forbidden(ip) else None
        name = host.rstrip(".").lower()
        if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always loopback
            return refused
        if not resolve:
            return None
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return f"the webhook host {host} cannot be resolved"
        for info in infos:
            address = literal_ip(str(info[4][0]))
            if address is None or is_forbidden(address):
                return f"the webhook host {host} resolves to the non-public address {info[4][0]}"
        return None

    async def check_url_async(self, url: str) -> str | None:
        """``check_url`` with the DNS lookup off the event loop, for the submit route."""
        return await asyncio.to_thread(self.check_url, url)

    # -- delivering

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def deliver(self, url: str, request_id: str, body: dict[str, Any]) -> asyncio.Task[bool]:
        """Start delivering ``body`` to ``url`` in the background; the task's result says if it arrived.

        Must be called on the event loop. The body is serialised once, so every retry sends (and signs)
        the same bytes; the timestamp and signature are fresh for each try.
        """
        if self._closed:
            raise RuntimeError("the webhook sender is closed")
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        task = asyncio.get_running_loop().create_task(
            self._run(url, request_id, data), name=f"webhook {request_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def aclose(self) -> None:
        """Cancel deliveries still pending (a restart drops them, as it would a retry timer) and close."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=GuardedTransport(self.allow_private_addresses),
                timeout=httpx.Timeout(self.timeout),
                follow_redirects=False,
                trust_env=False,
                headers={"user-agent": _USER_AGENT},
            )
        return self._client

    def _delay(self, attempt: int, hint: float | None) -> float:
        """Backoff before try ``attempt + 1``: exponential, capped, with "equal jitter" so receivers that
        failed together do not get retried together; a Retry-After hint is honoured up to the cap."""
        ceiling = min(self.backoff_max, self.backoff_base * 2.0 ** (attempt - 1))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        if hint is not None:
            delay = max(delay, min(hint, self.backoff_max))
        return delay

    async def _run(self, url: str, request_id: str, data: bytes) -> bool:
        extra = {"request_id": request_id}
        where = _where(url)
        problem = self.check_url(url, resolve=False)  # the connection itself is checked by the transport
        if problem is not None:
            self.failed += 1
            log.error("webhook to %s not sent: %s", where, problem, extra=extra)
            return False
        for attempt in range(1, self.attempts + 1):
            try:
                await self._attempt(url, request_id, data)
            except _Permanent as exc:
                self.failed += 1
                log.error("webhook to %s failed, not retrying: %s", where, exc, extra=extra)
                return False
            except _Transient as exc:
                if attempt == self.attempts:
                    self.failed += 1
                    log.error(
                        "webhook to %s failed (try %d of %d), giving up: %s",
                        where,
                        attempt,
                        self.attempts,
                        exc,
                        extra=extra,
                    )
                    return False
                delay = self._delay(attempt, exc.retry_after)
                log.warning(
                    "webhook to %s failed (try %d of %d): %s; retrying in %.1f s",
                    where,
                    attempt,
                    self.attempts,
                    exc,
                    delay,
                    extra=extra,
                )
                self.retries += 1
                await asyncio.sleep(delay)
            except Exception:  # a bug here must not leave an unretrieved task exception behind
                self.failed += 1
                log.exception("webhook to %s failed unexpectedly", where, extra=extra)
                return False
            else:
                self.delivered += 1
                log.info("webhook delivered to %s (try %d)", where, attempt, extra=extra)
                return True
        raise AssertionError("unreachable")

    async def _attempt(self, url: str, request_id: str, data: bytes) -> None:
        """One POST; returns on 2xx, raises ``_Transient`` or ``_Permanent`` otherwise."""
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "x-fal-webhook-request-id": request_id,
            "x-fal-webhook-user-id": self.user_id,
            "x-fal-webhook-timestamp": str(timestamp),
            "x-fal-webhook-signature": self.signer.sign(request_id, self.user_id, timestamp, data),
        }
        try:
            # httpx's timeout is per operation; this bounds the whole try, so a slow drip cannot hold it.
            async with (
                asyncio.timeout(self.timeout),
                self._http().stream("POST", url, content=data, headers=headers) as resp,
            ):
                code = resp.status_code  # the receiver's body is never read: it could be huge
        except ForbiddenAddress as exc:
            raise _Permanent(f"{exc.host} resolves to the non-public address {exc.address}") from None
        except TimeoutError:
            raise _Transient(f"no answer within {self.timeout:g} s") from None
        except httpx.UnsupportedProtocol as exc:
            raise _Permanent(str(exc)) from None
        except httpx.TimeoutException:
            raise _Transient(f"timed out ({self.timeout:g} s)") from None
        except httpx.TransportError as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        except httpx.InvalidURL as exc:
            raise _Permanent(f"invalid URL: {exc}") from None
        if 200 <= code < 300:
            return
        if code == 429 or code >= 500:
            raise _Transient(f"the receiver answered {code}", _retry_after(resp.headers.get("retry-after")))
        if 300 <= code < 400:
            raise _Permanent(f"the receiver answered {code} (redirects are not followed)")
        raise _Permanent(f"the receiver answered {code}")
