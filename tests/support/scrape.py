"""Scrape a daemon's metrics listener over real HTTP, as Prometheus would."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT = 10.0
POLL_INTERVAL = 0.05


@dataclass
class Scrape:
    status: int
    headers: dict[str, str]
    text: str

    def samples(self) -> dict[tuple[str, frozenset], float]:
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(self.text)
                for s in family.samples}

    def value(self, name: str, **labels: str) -> float | None:
        """The sample with exactly these labels, or None if the scrape has none."""
        return self.samples().get((name, frozenset(labels.items())))

    def total(self, name: str, **labels: str) -> float:
        """The sum over every sample of `name` whose labels include these."""
        wanted = set(labels.items())
        return sum(value for (sample, sample_labels), value in self.samples().items()
                   if sample == name and wanted <= sample_labels)


async def http_get(port: int, path: str = "/metrics", method: str = "GET",
                   host: str = "127.0.0.1", raw: bytes | None = None) -> Scrape:
    """One HTTP/1.1 request; the whole response (the listener closes after it)."""
    async with asyncio.timeout(SCRAPE_TIMEOUT):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(raw if raw is not None else
                         f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            response = await reader.read()
        finally:
            writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return Scrape(int(lines[0].split()[1]), headers, body.decode("utf-8"))


async def scrape(port: int) -> Scrape:
    result = await http_get(port)
    assert result.status == 200, result
    return result


async def scrape_until(port: int, ready: Callable[[Scrape], bool],
                       timeout: float = SCRAPE_TIMEOUT) -> Scrape:
    """Scrape until `ready(scrape)` (counters updated after a connection closes lag the
    client by a loop turn or two); fails with the last scrape after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await scrape(port)
        if ready(result):
            return result
        if loop.time() > deadline:
            raise AssertionError(f"metrics not as expected within {timeout}s:\n{result.text}")
        await asyncio.sleep(POLL_INTERVAL)  # polling a live daemon, bounded by the deadline
