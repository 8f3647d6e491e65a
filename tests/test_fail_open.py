"""Deadlines, retries and the circuit breaker that keep a remote tier's failures out of
the engine (``kvcache.kvstore.fail_open``)."""

from __future__ import annotations

import time

import pytest

from kvcache.kvstore.fail_open import (
    CircuitBreaker,
    Deadline,
    DeadlineExceededError,
    RemoteUnavailableError,
    call_with_retries,
)


def retrying(attempt, *, seconds=1.0, breaker=None, retries=2):
    return call_with_retries(attempt, deadline=Deadline(seconds),
                             breaker=breaker or CircuitBreaker(failures=100), retries=retries,
                             backoff_s=0.01, retry_on=(OSError,), what="test")


def test_transport_failures_are_retried_then_reported_as_unavailable():
    calls = []

    def attempt(dl):
        calls.append(dl.remaining())
        raise ConnectionRefusedError("refused")

    with pytest.raises(RemoteUnavailableError, match="refused"):
        retrying(attempt)
    assert len(calls) == 3


def test_a_retry_that_succeeds_returns_its_result():
    calls = []

    def attempt(dl):
        calls.append(1)
        if len(calls) < 2:
            raise ConnectionResetError
        return "ok"

    assert retrying(attempt) == "ok"


def test_refusals_the_server_meant_are_not_retried():
    calls = []

    def attempt(dl):
        calls.append(1)
        raise ValueError("413")

    with pytest.raises(ValueError):
        retrying(attempt)
    assert calls == [1]


def test_no_wait_past_the_deadline():
    def attempt(dl):
        time.sleep(min(dl.remaining(), 0.05))
        raise TimeoutError

    start = time.monotonic()
    with pytest.raises(RemoteUnavailableError):
        retrying(attempt, seconds=0.2, retries=50)
    assert time.monotonic() - start < 0.35


def test_an_expired_deadline_raises_without_calling():
    dl = Deadline(0.01)
    time.sleep(0.02)
    with pytest.raises(DeadlineExceededError):
        dl.remaining()
    with pytest.raises(DeadlineExceededError):
        call_with_retries(lambda d: 1, deadline=dl, breaker=CircuitBreaker(), retries=1,
                          backoff_s=0, retry_on=(OSError,), what="test")


def test_breaker_opens_refuses_then_lets_one_trial_through():
    b = CircuitBreaker(failures=2, reset_s=0.1)
    assert b.state == "closed"
    b.failure()
    assert b.allow()
    b.failure()
    assert b.state == "open" and not b.allow() and b.refused == 1
    time.sleep(0.12)
    assert b.state == "half-open"
    assert b.allow()          # the trial
    assert not b.allow()      # only one at a time
    b.failure()               # the trial failed: open again, for another reset_s
    assert b.state == "open" and b.times_opened == 1
    time.sleep(0.12)
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow()


def test_an_open_breaker_costs_no_attempt():
    b = CircuitBreaker(failures=1, reset_s=60)
    calls = []

    def attempt(dl):
        calls.append(1)
        raise ConnectionRefusedError

    with pytest.raises(RemoteUnavailableError):
        retrying(attempt, breaker=b, retries=0)
    with pytest.raises(RemoteUnavailableError, match="breaker open"):
        retrying(attempt, breaker=b, retries=0)
    assert calls == [1]
