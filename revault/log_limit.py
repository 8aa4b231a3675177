"""Log lines a peer can provoke, bounded: a flood of refusals must not become a flood of logs.

Anyone who can open a TCP connection can make a daemon refuse a handshake, and any
configured peer can make it refuse a request; logging each one would let a single client
write gigabytes a day into the journal (and drown what an operator needs to see). A
`LimitedLog` writes the first few lines of each topic per window as usual, counts the
rest, and writes one summary line for them when the window ends.

Topics must come from a bounded set (fixed strings, or the keys of configured peers):
never a source address or anything else an attacker chooses freely.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Hashable

DEFAULT_WINDOW = 60.0
DEFAULT_BURST = 3


@dataclass
class _Window:
    opened: float
    written: int = 0
    suppressed: int = 0
    level: int = logging.INFO
    last: tuple = ("", ())
    flush_scheduled: bool = False


class LimitedLog:
    """At most `burst` lines per topic per `window` seconds; the rest are summarized."""

    def __init__(self, logger: logging.Logger, *, window: float = DEFAULT_WINDOW,
                 burst: int = DEFAULT_BURST, clock: Callable[[], float] = time.monotonic):
        self._logger = logger
        self._window = window
        self._burst = burst
        self._clock = clock
        self._topics: dict[Hashable, _Window] = {}

    def log(self, level: int, topic: Hashable, message: str, *args: object,
            exc_info: bool = False) -> None:
        if not self._logger.isEnabledFor(level):
            return
        now = self._clock()
        window = self._topics.get(topic)
        if window is not None and now - window.opened >= self._window:
            self._summarize(window, now)
            window = None
        if window is None:
            window = self._topics[topic] = _Window(opened=now)
        if window.written < self._burst:
            window.written += 1
            self._logger.log(level, message, *args, exc_info=exc_info)
            return
        window.suppressed += 1
        window.level = max(window.level, level)
        window.last = (message, args)
        if not window.flush_scheduled:
            window.flush_scheduled = self._schedule_flush(window.opened + self._window - now)

    def flush(self, *, every_window: bool = False) -> None:
        """Write the summaries of windows that have ended, or of all of them (at shutdown),
        and forget those topics."""
        now = self._clock()
        for topic, window in list(self._topics.items()):
            if every_window or now - window.opened >= self._window:
                self._summarize(window, now)
                del self._topics[topic]

    def _summarize(self, window: _Window, now: float) -> None:
        if window.suppressed:
            message, args = window.last
            self._logger.log(window.level, message + " (and %d more like it in the last "
                             "%.0f s, not logged one by one)", *args, window.suppressed,
                             now - window.opened)
        window.suppressed = 0

    def _schedule_flush(self, delay: float) -> bool:
        # Without a later event, the count of a flood that stopped would never be written.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        loop.call_later(max(0.0, delay) + 0.01, self.flush)
        return True
