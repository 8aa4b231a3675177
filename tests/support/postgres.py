"""A real, throwaway PostgreSQL server for tests and benchmarks, on 127.0.0.1 only.

`PostgresServer.start()` runs Debian's `initdb` into a fresh temporary directory and
starts `postgres` on a free port; `stop()` shuts it down (fast, then killed after a
bound) and deletes the directory. `initdb` refuses to run as root, so when we are root
every server command runs as the `postgres` system user that Debian's package creates
(scripts/test installs the package when it is missing).

Each caller gets its own database (`new_database`), so tests sharing one server never
see each other's rows.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
SUPERUSER = "revault"
_database_numbers = itertools.count(1)


def postgres_bin_dir() -> Path:
    """The newest installed PostgreSQL server's bin directory ($POSTGRES_BIN wins)."""
    configured = os.environ.get("POSTGRES_BIN")
    if configured:
        return Path(configured)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not found:
        raise RuntimeError("no PostgreSQL server found under /usr/lib/postgresql: "
                           "run scripts/test (it installs Debian's postgresql package)")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_account() -> pwd.struct_passwd | None:
    """The account server commands run as: `postgres` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError("running as root but there is no `postgres` user: install "
                           "Debian's postgresql package (scripts/test does)") from None


def _as(account: pwd.struct_passwd | None) -> dict:
    """subprocess arguments that exec a command as `account` (no wrapper process, so
    signals reach the server itself)."""
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


@dataclass
class PostgresServer:
    directory: Path
    port: int
    process: subprocess.Popen
    log_path: Path
    _stopped: bool = field(default=False)

    @classmethod
    def start(cls) -> PostgresServer:
        bin_dir = postgres_bin_dir()
        account = _server_account()
        directory = Path(tempfile.mkdtemp(prefix="revault-pg-"))
        data, sockets = directory / "data", directory / "sockets"
        sockets.mkdir()
        if account is not None:
            for path in (directory, sockets):
                os.chown(path, account.pw_uid, account.pw_gid)
        log_path = directory / "server.log"
        try:
            subprocess.run(
                [str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER,
                 "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync"],
                check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=120,
                cwd=directory, **_as(account))
        except subprocess.CalledProcessError as e:
            shutil.rmtree(directory, ignore_errors=True)
            raise RuntimeError(f"initdb failed:\n{e.stderr.decode(errors='replace')}") from None
        for attempt in range(5):
            port = _free_port()
            log = open(log_path, "ab")
            process = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
                 "-c", "listen_addresses=127.0.0.1",
                 "-c", f"unix_socket_directories={sockets}",
                 "-c", "max_connections=300", "-c", "fsync=on",
                 "-c", "synchronous_commit=on"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                cwd=directory, **_as(account))
            log.close()
            server = cls(directory, port, process, log_path)
            if server._wait_ready():
                return server
            server._terminate()
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeError(f"postgres did not start:\n{log_path.read_text(errors='replace')}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False  # e.g. the port was taken between probing and binding
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
            except OSError:
                time.sleep(0.05)  # polling a starting server, bounded by the deadline
                continue
            ready = subprocess.run(
                [str(postgres_bin_dir() / "pg_isready"), "-h", "127.0.0.1",
                 "-p", str(self.port), "-U", SUPERUSER, "-t", "1"],
                capture_output=True)
            if ready.returncode == 0:
                return True
            time.sleep(0.05)
        return False

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def new_database(self, prefix: str = "revault") -> str:
        """Create an empty database and return its DSN."""
        name = f"{prefix}_{os.getpid()}_{next(_database_numbers)}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def psql(self, sql: str, database: str = "postgres") -> str:
        result = subprocess.run(
            ["psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
             "-d", self.dsn(database), "-c", sql],
            capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"psql {sql!r}: {result.stderr}")
        return result.stdout

    def _terminate(self) -> None:
        if self.process.poll() is None:
            # SIGINT is postgres' "fast" shutdown: roll back sessions, checkpoint, exit.
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self._terminate()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
