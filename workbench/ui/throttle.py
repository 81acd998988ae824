"""Slowing down password guessing on the app's login form (`POST /login`).

Gradio checks the password of `launch(auth=...)` in its `/login` route and answers each wrong one
at once, so a script could try thousands a minute. `LoginThrottleMiddleware` sits in front of that
route and counts attempts per client address: the first `free_attempts` failures in a row cost
nothing; after them the address must wait `first_lock_s` seconds before its next attempt, and each
further failure doubles the wait, up to `max_lock_s`. Meanwhile its attempts are answered with
HTTP 429 and a `Retry-After` header, without the password being looked at. A successful login
clears the address's count; other addresses are not affected.

An attempt counts as failed from the moment it arrives until it succeeds, so a burst of concurrent
guesses is cut off after `free_attempts` like a sequence of them. The client address is the one
the server sees (uvicorn takes it from `X-Forwarded-For` only when the connection comes from a
proxy on this machine), so users behind one shared proxy address share one count.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

LOGIN_PATH = "/login"


@dataclass
class _Address:
    failures: int = 0
    locked_until: float = 0.0
    last_attempt: float = 0.0


class LoginThrottle:
    """Failed logins per client address, and how long each address must wait (the policy; the
    middleware below applies it). `clock` is monotonic seconds. Used from the server's event loop
    only, so it takes no lock; it keeps at most `max_addresses` addresses."""

    def __init__(self, free_attempts: int = 5, first_lock_s: float = 2.0, max_lock_s: float = 300.0,
                 forget_after_s: float = 3600.0, max_addresses: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self.free_attempts = free_attempts
        self.first_lock_s = first_lock_s
        self.max_lock_s = max_lock_s
        self.forget_after_s = forget_after_s
        self.max_addresses = max_addresses
        self.clock = clock
        self._addresses: OrderedDict[str, _Address] = OrderedDict()

    def retry_after(self, address: str) -> float:
        """Seconds `address` must still wait before its next attempt (0: it may try now)."""
        record = self._addresses.get(address)
        return max(0.0, record.locked_until - self.clock()) if record else 0.0

    def attempt(self, address: str) -> None:
        """An attempt from `address` starts: count it as failed until `succeeded` says otherwise;
        from the `free_attempts`-th failure on, lock the address for a doubling time."""
        now = self.clock()
        record = self._addresses.pop(address, None) or _Address()
        record.failures += 1
        record.last_attempt = now
        beyond = record.failures - self.free_attempts
        if beyond >= 0:
            record.locked_until = now + self.lock_seconds(beyond)
        self._addresses[address] = record  # most recent last
        self._forget_old(now)

    def lock_seconds(self, beyond: int) -> float:
        """The wait after the (free_attempts + beyond)-th failure in a row."""
        return min(self.max_lock_s, self.first_lock_s * 2.0 ** min(beyond, 64))

    def succeeded(self, address: str) -> None:
        """A correct password from `address`: its count starts again from zero."""
        self._addresses.pop(address, None)

    def _forget_old(self, now: float) -> None:
        """Drop addresses not seen for `forget_after_s` (and the oldest beyond `max_addresses`),
        unless still locked."""
        while self._addresses:
            address, oldest = next(iter(self._addresses.items()))
            stale = now - oldest.last_attempt > self.forget_after_s and oldest.locked_until <= now
            if not stale and len(self._addresses) <= self.max_addresses:
                return
            del self._addresses[address]


class LoginThrottleMiddleware:
    """ASGI middleware applying a `LoginThrottle` to `POST /login`; every other request passes
    through untouched."""

    def __init__(self, app, throttle: LoginThrottle | None = None):
        self.app = app
        self.throttle = throttle or LoginThrottle()

    async def __call__(self, scope, receive, send):
        if not _is_login(scope):
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or ("unknown",))[0]
        wait = self.throttle.retry_after(address)
        if wait > 0:
            await _too_many(send, wait)
            return
        self.throttle.attempt(address)
        status = {}

        async def watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if status.get("code") == 200:
            self.throttle.succeeded(address)


def _is_login(scope) -> bool:
    return scope["type"] == "http" and scope.get("method") == "POST" \
        and scope.get("path", "").rstrip("/").endswith(LOGIN_PATH)


async def _too_many(send, wait: float) -> None:
    """HTTP 429 with Retry-After (whole seconds, rounded up)."""
    seconds = max(1, math.ceil(wait))
    body = json.dumps({"detail": f"Too many failed logins from this address; try again in "
                                 f"{seconds} s."}).encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(seconds).encode())]})
    await send({"type": "http.response.body", "body": body})
