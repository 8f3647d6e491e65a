"""``kvcache bench e2e`` serves the same requests through every engine in turns, round by
round, each engine storing its saves before the next one's turn (``_in_turns``). The
engines here are stand-ins that log what they are asked: the order is the point; the
real engines run in the vLLM stage (``tests/vllm/test_bench_e2e.py``)."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

from kvcache.tools.bench_e2e import Workload, _in_turns, _turn_orders


class _Logged:
    def __init__(self, name: str, log: list[tuple[str, Any]]) -> None:
        self.name, self.log = name, log
        self.started = {"engine_start_s": 1.0}

    def serve(self, req: dict[str, Any]) -> dict[str, Any]:
        self.log.append((self.name, (req["user"], req["round"])))
        return {"user": req["user"], "round": req["round"], "ttft_s": 0.1}

    def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.log.append((self.name, msg["cmd"]))
        return {"quiesce_s": 0.25} if msg["cmd"] == "quiesce" else {}

    def close(self) -> dict[str, Any]:
        return {"closed": self.name}


def test_engines_take_turns_half_a_round_at_a_time_and_store_their_saves_in_between() -> None:
    w = Workload(users=4, rounds=3)
    requests = w.requests()
    log: list[tuple[str, Any]] = []
    engines = {name: _Logged(name, log) for name in ("a", "b", "c")}
    out = _in_turns(engines, requests)  # type: ignore[arg-type]

    order = [(r["user"], r["round"]) for r in requests]
    for name in engines:  # every engine served every request, in the workload's order
        assert [(r["user"], r["round"]) for r in out[name]["requests"]] == order
        assert out[name]["kvcache"] == {"closed": name}
    # Before the first turn every engine stores what its warm-up saved (not timed).
    assert log[:3] == [("a", "quiesce"), ("b", "quiesce"), ("c", "quiesce")]
    # A turn: an untimed request, its saves stored, half a round's requests back to
    # back, their saves stored (that time reported, the warm-up's not).
    turns = []  # (engine, requests served) per turn
    served: list[Any] = []
    for name, what in log[3:]:
        served.append(what)
        if what == "quiesce" and len(served) > 2:
            assert served[:2] == ["wake", "quiesce"]
            turns.append((name, served[2:-1]))
            served = []
    assert served == []
    # rotated round by round, reversed for the second half: of any two engines, each
    # goes first once in every round
    assert "".join(t[0] for t in turns) == "abc" "cba" "bca" "acb" "cab" "bac"
    for i, (_, reqs) in enumerate(turns):
        half = i // 3
        assert reqs == [(u, half // 2) for u in range(2 * (half % 2), 2 * (half % 2) + 2)]
    assert {out[name]["stored_after_turns_s"] for name in engines} == {1.5}


def test_kvcache_per_request_pairs_users_and_takes_each_place_in_a_half_with_and_without() -> None:
    """The first request of a turn is slower than the others: requests with kvcache and
    without must take that place (and every other) equally often, or the comparison is
    the places'."""
    for users in (2, 4, 6, 8, 12):
        w = Workload(users=users)
        assert len(w.pairs()) == users // 2
        for on, off in w.pairs():
            assert abs(on - off) == 1 and not w.kvcache_off(on) and w.kvcache_off(off)
        half = users // 2
        for place in range(half):
            assert {w.kvcache_off(place), w.kvcache_off(half + place)} == {False, True}
    order = [(on < off) for on, off in Workload(users=8).pairs()]
    assert order.count(True) == order.count(False)


def test_over_three_rounds_each_of_six_engines_takes_its_turn_after_every_other_once() -> None:
    """What an engine leaves behind (memory the kernel is still reclaiming) reaches the
    engine after it: no engine may always follow the same ones."""
    rows = _turn_orders(6, 3)
    follows = Counter(pair for row in rows for half in (row, row[::-1])
                      for pair in itertools.pairwise(half))
    assert len(follows) == 6 * 5 and set(follows.values()) == {1}
    for row in rows:  # each round's first half gives every engine one turn
        assert sorted(row) == list(range(6))
