"""RPC sessions that go quiet are closed: the tracker's and a daemon's TCP RPC do not keep a
silent (dead or hostile) client's session forever, while a long call still gets its answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
import trio.testing
from vmswarm.daemon.rpc import Notifier, RpcClient, serve_rpc
from vmswarm.daemon.tracker_client import TrackerClient

from .test_tracker import receive_until_closed, start_tracker


async def _slow(params: dict[str, Any], notifier: Notifier) -> dict[str, Any]:
    await trio.sleep(params["seconds"])
    return {"slept": params["seconds"]}


async def test_a_silent_session_is_closed_but_a_long_call_is_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server_end, client_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def serve() -> None:
            await serve_rpc(server_end, {"slow": _slow}, idle_timeout=10.0)
            done.set()

        nursery.start_soon(serve)
        client = RpcClient(client_end)
        # The call itself runs three idle periods: the timer only runs between calls.
        assert await client.call("slow", {"seconds": 30.0}) == {"slept": 30.0}
        assert await client.call("slow", {"seconds": 0.0}) == {"slept": 0.0}
        assert not done.is_set()
        await trio.sleep(11.0)
        assert done.is_set()
        assert await client_end.receive_some() == b""


async def test_the_tracker_hangs_up_on_a_client_that_never_calls(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        # Idle limit: two announce TTLs.
        host, port = await start_tracker(nursery, tmp_path / "state", announce_ttl=0.2)
        answered = [trio.Event()]

        async def keep_calling(busy: TrackerClient) -> None:
            while True:
                assert await busy.list_templates() == []
                answered[-1].set()
                await trio.sleep(0.05)

        async with await TrackerClient.connect(host, port) as busy:
            nursery.start_soon(keep_calling, busy)
            silent = await trio.open_tcp_stream(host, port)
            assert await receive_until_closed(silent) == b""
            await silent.aclose()
            # The client that kept calling meanwhile was not cut off: it is still answered.
            answered.append(trio.Event())
            with trio.fail_after(5):
                await answered[-1].wait()
            nursery.cancel_scope.cancel()
