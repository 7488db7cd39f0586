"""The turns of one session, one at a time and in order, even when one fails and comes again."""

from __future__ import annotations

import asyncio

import pytest

from chatpipe.worker.service import TurnPostponedError, _SessionTurns


def test_a_failed_turn_fails_those_queued_behind_it_and_the_session_starts_afresh():
    sessions = _SessionTurns()
    ran: list[str] = []

    async def turn(name: str, session: str = "s", fail: bool = False) -> None:
        async with sessions.turn(session):
            ran.append(name)
            await asyncio.sleep(0.01)
            if fail:
                raise ConnectionError("redis is down")

    async def scenario() -> list[BaseException | None]:
        first = await asyncio.gather(turn("a", fail=True), turn("b"), turn("c"), turn("other", session="t"),
                                     return_exceptions=True)  # fmt: skip
        again = await asyncio.gather(turn("a"), turn("b"), turn("c"), return_exceptions=True)  # redelivered
        return [*first, *again]

    outcomes = asyncio.run(scenario())
    assert isinstance(outcomes[0], ConnectionError)
    assert all(isinstance(outcome, TurnPostponedError) for outcome in outcomes[1:3]), outcomes
    assert outcomes[3:] == [None, None, None, None]
    # b and c never ran before a; the other session's turn did not wait; redelivered, in order.
    assert ran == ["a", "other", "a", "b", "c"]


def test_a_turn_cancelled_by_a_stop_fails_those_behind_it_too():
    sessions = _SessionTurns()

    async def turn() -> None:
        async with sessions.turn("s"):
            await asyncio.sleep(10)

    async def scenario() -> BaseException:
        first = asyncio.ensure_future(turn())
        second = asyncio.ensure_future(turn())
        await asyncio.sleep(0.01)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await asyncio.gather(second, return_exceptions=True)

    assert isinstance(asyncio.run(scenario())[0], TurnPostponedError)
