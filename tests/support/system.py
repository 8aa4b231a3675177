"""What the host must allow for the many-connection tests and benchmarks."""

from __future__ import annotations

import resource


class FdLimitError(RuntimeError):
    """The hard limit on open files is below what a many-connection run needs."""


def raise_fd_limit(needed: int) -> None:
    """Raise this process's soft limit on open files to `needed`.

    A machine that cannot open that many sockets cannot run the test or benchmark at
    all: that is an error saying why, never a silent skip or a half-measured run.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise FdLimitError(f"file-descriptor hard limit {hard} is below {needed}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
