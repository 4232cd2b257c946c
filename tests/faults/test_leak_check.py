"""The fault suite's leak check can fail: a response the router never releases is counted.

Closing the router closes every connection, the in-use ones too, so the rig counts what its requests left
behind before it closes (``harness._settle``). Here the expert's HTTP client is patched to leak: it leaves a
stalled stream's response open instead of closing it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pytest

import experts.http_client as http_client
from tests.faults.harness import FAULTS, count_leaks, rig


@pytest.mark.parametrize("leak", [False, True], ids=["released", "leaked"])
async def test_a_response_never_released_is_counted(monkeypatch: pytest.MonkeyPatch, leak: bool) -> None:
    leaked: list[Any] = []

    @asynccontextmanager
    async def leaky_stream(self: http_client.AiohttpClient, url: str, body: Mapping[str, Any],
                           headers: Mapping[str, str] | None = None) -> AsyncIterator[http_client.HttpStream]:
        session = await self._open()
        async with self._slots.held():
            response = await session.post(url, json=body, headers=headers)
            leaked.append(response)
            yield http_client._AiohttpStream(response)  # neither released nor closed

    if leak:
        monkeypatch.setattr(http_client.AiohttpClient, "stream", leaky_stream)
    before = len(asyncio.all_tasks())
    try:
        async with rig() as r:
            r.servers["a"].push(FAULTS["stall_mid_stream"])  # one stall; the retry on "a" answers
            reply = await r.chat("q", stream=True)
            assert reply.status == 200 and reply.content
        leaks = await count_leaks(r, before)
    finally:
        for response in leaked:  # the test made the leak; it cleans it up
            response.close()
    assert leaks.tasks == 0
    assert leaks.connections == (1 if leak else 0)
