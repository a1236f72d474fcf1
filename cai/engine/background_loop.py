"""An asyncio event loop on its own daemon thread, kept for an engine's lifetime.

Synchronous callers hand it coroutines (`run`) from any thread, also from inside a running
event loop of their own (the service, Jupyter). Each coroutine runs in a copy of the caller's
context, so the job's stop check (cai.engine.base.stop_scope) reaches its tasks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class LoopStopped(RuntimeError):
    """The loop was stopped before or while a coroutine handed to it ran."""


class BackgroundLoop:
    def __init__(self, name: str = "cai-background-loop"):
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    @property
    def running(self) -> bool:
        return not self._stopping and self._thread.is_alive()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start `coro` on the loop in a copy of the caller's context; its future, without waiting."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a BackgroundLoop cannot wait for itself: call it from another thread")
        with self._lock:  # a stop() cannot slip between the check and the submission
            if self._stopping:
                coro.close()
                raise LoopStopped("the background loop was stopped")
            context = contextvars.copy_context()
            # The task is created in (a copy of) this context: context variables cross the thread.
            return context.run(asyncio.run_coroutine_threadsafe, coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop in a copy of the caller's context and block until it is done.

        An exception of the caller while it waits (KeyboardInterrupt) cancels the coroutine."""
        future = self.submit(coro)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            if self._stopping:
                raise LoopStopped("the background loop was stopped while the call ran") from None
            raise
        except BaseException:
            future.cancel()  # no-op once done
            raise

    def stop(self, cleanup: Callable[[], Awaitable[object]] | None = None, wait: bool = True,
             timeout: float = 10.0) -> None:
        """Cancel the coroutines still running, await `cleanup()` on the loop, and stop it.

        `wait`: block until the thread has ended (at most `timeout` seconds). Safe to call from any
        thread, the loop's own included (then it never waits), and more than once."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        try:
            done = asyncio.run_coroutine_threadsafe(_finish(cleanup), self._loop)
        except RuntimeError:  # the loop is already closed (interpreter shutdown)
            return
        done.add_done_callback(lambda _: self._loop.call_soon_threadsafe(self._loop.stop))
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if done.done() and not done.cancelled() and done.exception() is not None:
                log.warning("closing a background loop's resources failed: %r", done.exception())


async def _finish(cleanup: Callable[[], Awaitable[object]] | None) -> None:
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not current]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if cleanup is not None:
        await cleanup()
