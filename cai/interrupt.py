"""Ctrl-C handling shared by the CLI's stoppable jobs and `cai run`'s stage runner."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

SigintHandler = Callable[[int, Any], None] | int


@contextmanager
def sigint_handler(handler: SigintHandler) -> Iterator[None]:
    """Handle SIGINT with `handler` inside the block, then restore the previous handler.

    Outside the main thread (where Python cannot set handlers, e.g. the service's workers)
    nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:  # None: the previous handler was not set from Python
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
