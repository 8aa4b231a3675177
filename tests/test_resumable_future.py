import asyncio

import pytest

from revault.resumable_future import ResumableFuture


async def test_the_driver_runs_inside_the_setter_once():
    for settle in (lambda f: f.set_result(1), lambda f: f.set_exception(ValueError("x")),
                   lambda f: f.cancel()):
        future, calls = ResumableFuture(), []
        assert future.resume_with(lambda: calls.append(future.done()))
        settle(future)
        assert calls == [True]
        future.exception() if not future.cancelled() else None
        assert not future.resume_with(lambda: calls.append("again"))  # done already
        assert calls == [True]


async def test_a_driver_withdrawn_is_not_called():
    future, calls = ResumableFuture(), []
    future.resume_with(lambda: calls.append(1))
    future.resume_with(None)
    future.set_result(None)
    assert calls == []


async def test_a_failing_driver_is_reported_and_the_setter_returns():
    loop = asyncio.get_running_loop()
    reported = []
    loop.set_exception_handler(lambda loop, context: reported.append(context["exception"]))
    try:
        future = ResumableFuture()
        future.resume_with(lambda: 1 / 0)
        future.set_result("kept")
        assert future.result() == "kept"
        assert [type(e) for e in reported] == [ZeroDivisionError]
    finally:
        loop.set_exception_handler(None)


async def test_a_task_awaits_it_as_any_future():
    future = ResumableFuture()
    waiter = asyncio.create_task(asyncio.wait_for(future, 5))
    await asyncio.sleep(0)
    future.set_result(7)
    assert await waiter == 7
    cancelled = ResumableFuture()
    waiter = asyncio.create_task(asyncio.wait_for(cancelled, 5))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert cancelled.cancelled()
