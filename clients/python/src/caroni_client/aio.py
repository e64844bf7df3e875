"""The client for asyncio: :class:`Client` has every method of
:class:`caroni_client.Client`, as coroutines, and its streams (``watch``,
``watch_all``, ``iter_workflows``) as async iterators.

Each call runs the blocking client's call in a worker thread
(``asyncio.to_thread``), so one event loop can start, watch and cancel many
workflows at once without a thread of its own per workflow::

    import asyncio
    from caroni_client.aio import Client

    async def main():
        async with Client("http://127.0.0.1:7070") as c:
            ids = await asyncio.gather(*(c.run("test_simple", {"start_message": f"m{i}"}) for i in range(10)))
            async for change in c.watch_all(timeout=60):
                print(change.workflow_id, change.state)

    asyncio.run(main())
"""

from __future__ import annotations

import asyncio
import functools
import threading
from typing import Any, AsyncIterator, Callable, Iterator, Optional

from . import client as _sync

#: Methods that return iterators: delivered as async iterators.
_STREAMS = frozenset({"watch", "watch_all", "iter_workflows", "logs"})

_END = object()


class Client:
    """An asyncio view of :class:`caroni_client.Client` (same arguments)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._sync = _sync.Client(*args, **kwargs)

    async def close(self) -> None:
        """Close the connection."""
        await asyncio.to_thread(self._sync.close)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"aio.Client({self._sync.url!r})"

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._sync, name)
        if name.startswith("_") or not callable(method):
            return method
        if name in _STREAMS:

            def stream(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
                return _iterate(functools.partial(method, *args, **kwargs))

            return stream

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return call


async def _iterate(make: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """Runs a blocking iterator in a thread and hands its items (or its
    error) to the event loop. Leaving the ``async for`` early stops the
    thread at its next item."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(maxsize=64)
    stop = threading.Event()

    def put(item: Any) -> None:
        fut = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
        fut.result()

    def pump() -> None:
        it: Optional[Iterator[Any]] = None
        try:
            it = make()
            for item in it:
                if stop.is_set():
                    break
                put(item)
            put(_END)
        except BaseException as e:  # delivered to the reader
            put(e)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=pump, daemon=True)
    worker.start()
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # Let a blocked put() finish so that the thread can see `stop`.
        while not queue.empty():
            queue.get_nowait()
