"""Run a revault daemon as a real subprocess for end-to-end tests.

Readiness comes from the daemon itself: it sends READY=1 with a STATUS line carrying
the bound port over $NOTIFY_SOCKET, exactly as it would to systemd, so tests exercise
sd_notify and need no fixed sleeps or port guessing.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from revault.keys import create_key_file, generate_noise_key, noise_public_key
from tests.support import markers

READY_TIMEOUT = 30.0
REPO_ROOT = Path(__file__).resolve().parents[2]
STOP_TIMEOUT = 15.0


def to_toml(data: dict, _prefix: str = "") -> str:
    """Enough TOML for our configs: scalars, lists of scalars, nested tables."""
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables:
        name = f"{_prefix}{key}"
        out += f"\n[{name}]\n" + to_toml(value, name + ".")
    return out


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


@dataclass
class NoiseIdentity:
    """A generated Noise key pair, its secret also saved as a 0600 key file."""

    private: bytes
    public: bytes
    path: Path

    @classmethod
    def create(cls, path: Path) -> NoiseIdentity:
        private = generate_noise_key()
        create_key_file(path, private)
        return cls(private, noise_public_key(private), path)


@dataclass
class DaemonProcess:
    name: str
    config_path: Path
    workdir: Path
    module: str = ""  # default: revault.<name>
    root: Path = REPO_ROOT  # the source tree the daemon runs from (a bench compares two)
    preexec_fn: object = None  # e.g. to lower RLIMIT_NOFILE in the child only
    proc: subprocess.Popen | None = None
    port: int = 0
    stderr_path: Path = field(init=False)
    _starts: int = 0

    def __post_init__(self):
        self.stderr_path = self.workdir / f"{self.name}.stderr"

    async def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start the daemon and wait for its READY=1; fail with its stderr if it dies."""
        markers.check("daemon")
        self._starts += 1
        notify_path = self.workdir / f"notify-{self._starts}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(notify_path))
        sock.setblocking(False)
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(self.root),
                                                            os.environ.get("PYTHONPATH")])))
        module = self.module or f"revault.{self.name.replace('-', '_')}"
        stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module,
             "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=env,
            cwd=self.root, preexec_fn=self.preexec_fn)
        stderr.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(f"{self.name} not ready in {timeout}s:\n{self.stderr()}")
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode}:\n{self.stderr()}")
                try:
                    message = await asyncio.wait_for(loop.sock_recv(sock, 4096),
                                                     min(remaining, 0.2))
                except asyncio.TimeoutError:
                    continue
                text = message.decode()
                if "READY=1" in text.split("\n"):
                    match = re.search(r"STATUS=listening on .*:(\d+)", text)
                    self.port = int(match.group(1)) if match else 0
                    return
        finally:
            sock.close()
            notify_path.unlink(missing_ok=True)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send `sig` and wait for the exit; returns the exit status (kills after timeout)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.proc.poll() is None:
            if loop.time() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise TimeoutError(f"{self.name} did not stop within {timeout}s:\n{self.stderr()}")
            await asyncio.sleep(0.02)  # polling a child's exit; bounded by the deadline
        return self.proc.returncode

    async def kill(self) -> None:
        """SIGKILL: the crash a durability test needs."""
        await self.stop(signal.SIGKILL)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def write_config(path: Path, config: dict) -> Path:
    path.write_text(to_toml(config))
    return path
