"""A future whose waiter can be resumed inside `set_result`, one event-loop turn sooner.

asyncio resumes whatever awaits a future one turn after the future is set: `set_result`
schedules the waiter's callback with `call_soon`. Under load a turn of the loop is most
of a request's latency, so a write that waits for its group's COMMIT loses a whole turn
there after the fsync (storage.GroupCommitWriter resolves these futures).

A driver that runs a coroutine by hand (rpc's connection server does, for the requests
it starts in the transport's callback) may call `resume_with(callback)` instead of
adding a done callback: `callback()` then runs inside `set_result`/`set_exception`/
`cancel`, and the driver sends the coroutine on from there. A task that awaits one of
these futures sees an ordinary asyncio future.

Whoever resolves one must be ready for the driver's work to run inside that call, and
must not be inside a task then if it wants the turn saved (the driver defers to the
next turn when a task is current, as a task cannot run inside another one).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable


class ResumableFuture(asyncio.Future):
    __slots__ = ("_resume",)

    def __init__(self, *, loop: asyncio.AbstractEventLoop | None = None):
        super().__init__(loop=loop)
        self._resume: Callable[[], None] | None = None

    def resume_with(self, callback: Callable[[], None] | None) -> bool:
        """Have `callback()` called once this future is done (None: no longer).
        False if it is done already: the caller goes on at once instead."""
        if self.done():
            return False
        self._resume = callback
        return True

    def _resumed(self) -> None:
        callback, self._resume = self._resume, None
        if callback is None:
            return
        try:
            callback()
        except Exception as e:  # the resolver's other futures must still be resolved
            self.get_loop().call_exception_handler({
                "message": "exception in a resumable future's driver",
                "exception": e, "future": self})

    def set_result(self, result: Any) -> None:
        super().set_result(result)
        self._resumed()

    def set_exception(self, exception: BaseException | type[BaseException]) -> None:
        super().set_exception(exception)
        self._resumed()

    def cancel(self, msg: Any = None) -> bool:
        cancelled = super().cancel(msg)
        if cancelled:
            self._resumed()
        return cancelled
