"""Failing open: how tiers on the other side of a network stay out of the engine's way.

A remote tier (the cache daemon, Redis) that is down, slow, restarting or answering
garbage must cost the engine a miss, never an exception and never a wait beyond the
deadline. Three small pieces give that:

- ``Deadline``: one budget of seconds for a whole request, retries included; every socket
  timeout is what is left of it.
- ``CircuitBreaker``: after ``failures`` requests in a row fail, calls are refused at once
  (no connect, no timeout to wait out) for ``reset_s``; then one trial request is let
  through, and its outcome closes the breaker or opens it again.
- ``call_with_retries``: the retry loop with jittered exponential backoff inside a deadline,
  guarded by a breaker. Failures come back as ``RemoteUnavailableError``, which the tiers
  turn into counted misses and skipped writes.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from kvcache.kvstore.errors import KVCacheError

T = TypeVar("T")


class RemoteUnavailableError(KVCacheError):
    """A remote tier could not answer in time (down, slow, breaker open, bad reply)."""


class DeadlineExceededError(RemoteUnavailableError):
    """The request's deadline passed before it got an answer."""


class Deadline:
    """A point in time requests must finish by (monotonic clock)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left; raises ``DeadlineExceededError`` when none are."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError(f"deadline of {self.seconds:g}s exceeded")
        return left

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.end


class CircuitBreaker:
    """Closed → open after ``failures`` consecutive failures → half-open after ``reset_s``
    (one trial call) → closed on its success, open again on its failure. Thread-safe."""

    def __init__(self, failures: int = 3, reset_s: float = 2.0) -> None:
        if failures < 1 or reset_s < 0:
            raise ValueError("a breaker needs failures >= 1 and reset_s >= 0")
        self.failures = failures
        self.reset_s = reset_s
        self._lock = threading.Lock()
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial_running = False
        self.times_opened = 0
        self.refused = 0

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            return "half-open" if self._reset_due() else "open"

    def _reset_due(self) -> bool:
        assert self._opened_at is not None
        return time.monotonic() - self._opened_at >= self.reset_s

    def allow(self) -> bool:
        """May a request go out now? (In half-open state, only one at a time.)"""
        with self._lock:
            if self._opened_at is None:
                return True
            if self._reset_due() and not self._trial_running:
                self._trial_running = True
                return True
            self.refused += 1
            return False

    def success(self) -> None:
        with self._lock:
            self._consecutive = 0
            self._opened_at = None
            self._trial_running = False

    def failure(self) -> None:
        with self._lock:
            self._consecutive += 1
            trial = self._trial_running
            self._trial_running = False
            if trial or (self._opened_at is None and self._consecutive >= self.failures):
                if self._opened_at is None:
                    self.times_opened += 1
                self._opened_at = time.monotonic()


def call_with_retries(
    attempt: Callable[[Deadline], T],
    *,
    deadline: Deadline,
    breaker: CircuitBreaker,
    retries: int,
    backoff_s: float,
    retry_on: tuple[type[BaseException], ...],
    what: str,
) -> T:
    """``attempt(deadline)`` until it returns, at most ``1 + retries`` times, sleeping a
    jittered ``backoff_s * 2**i`` between tries but never past the deadline.

    Exceptions in ``retry_on`` are transport failures: they count against the breaker and
    end as ``RemoteUnavailableError``. Anything else (a refusal the server meant, such as
    a 413) propagates at once and counts as the server being alive.
    """
    last: BaseException | None = None
    for i in range(retries + 1):
        if deadline.expired:
            break
        if not breaker.allow():
            raise RemoteUnavailableError(f"{what}: circuit breaker open after repeated failures")
        try:
            result = attempt(deadline)
        except retry_on as e:
            breaker.failure()
            last = e
            if isinstance(e, DeadlineExceededError):
                break
            pause = backoff_s * (2**i) * (0.5 + random.random())
            if i == retries or time.monotonic() + pause >= deadline.end:
                break
            time.sleep(pause)
            continue
        except BaseException:
            breaker.success()
            raise
        breaker.success()
        return result
    if last is None:
        raise DeadlineExceededError(f"{what}: deadline of {deadline.seconds:g}s exceeded")
    if isinstance(last, RemoteUnavailableError):
        raise RemoteUnavailableError(f"{what}: {last}") from last
    raise RemoteUnavailableError(f"{what} failed: {last!r}") from last
