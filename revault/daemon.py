"""What every revault daemon shares: config, keys, data dir, logs, listen, sd_notify, signals.

A daemon module provides three things to `run_daemon`: a function that reads its own
config keys from the TOML table (next to the common ones read here), a coroutine that
builds its `Service` (dispatcher, peers and roles, storage), and a coroutine that
summarizes its database for `revault-<name> --config FILE status`. Everything else
(parsing the command line, refusing bad configs before anything starts, the data
directory, the Noise server, the metrics listener, text or JSON logs, READY=1, a clean
stop on SIGTERM/SIGINT, the common part of `status` and its text and JSON output) lives
here once.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import json
import logging
import os
import resource
import signal
import socket
import sqlite3
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Protocol, TypeVar

from revault import metrics
from revault.config import ConfigError, ConfigTable, ProblemCollector, load_config_file
from revault.keys import KeyFileError, noise_public_key, read_key_file
from revault.rpc import Caller, Dispatcher, RequestPacer, serve_connection
from revault.storage import StorageError, open_read_only, storage_error_cause
from revault.transport import NoiseConnection, ServerLimits, start_server

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
STATUS_PROBE_TIMEOUT = 2.0  # seconds for `status` to see whether the daemon accepts
EXIT_CONFIG = 2   # the config or a key file is unusable: fix it, restarting will not help
EXIT_FAILURE = 1  # failed at run time (port taken, database refused)
# File descriptors a daemon needs besides its connections: the listening socket, SQLite
# (database, WAL, shared memory, read-only connections), bitcoind and ZMQ sockets, the
# event loop's own. max_connections must leave them room, or accept() fails under load.
FD_MARGIN = 64

log = logging.getLogger("revault.daemon")


@dataclass(frozen=True)
class CommonConfig:
    """The keys every daemon's config has."""

    listen_host: str
    listen_port: int
    data_dir: Path
    noise_key_file: Path
    idle_timeout: float
    max_connections: int
    log_level: str
    requests_per_second: float | None  # per peer key, all its connections; None: no limit
    max_handshakes: int
    max_handshakes_per_address: int
    max_connections_per_peer: int
    write_timeout: float
    log_format: str = "text"
    metrics_listen: tuple[str, int] | None = None  # None: no metrics listener

    @classmethod
    def read(cls, table: ConfigTable, base: Path, *,
             requests_per_second: float | None = None) -> CommonConfig:
        """The common keys; `requests_per_second` is this daemon's default for that key.

        Problems are collected, not raised one by one: see ProblemCollector.
        """
        p = ProblemCollector()
        defaults = ServerLimits()
        listen = p.read(table.listen, "listen")
        log_level = p.read(table.string, "log_level", "info")
        if log_level is not None and log_level not in LOG_LEVELS:
            p.add(f"{table.key_name('log_level')}: must be one of {', '.join(LOG_LEVELS)}")
        log_format = p.read(table.string, "log_format", "text")
        if log_format is not None and log_format not in LOG_FORMATS:
            p.add(f"{table.key_name('log_format')}: must be one of {', '.join(LOG_FORMATS)}")
        max_connections = p.read(table.integer, "max_connections", minimum=1,
                                 maximum=100_000, default=1024)
        # By default a quarter of the sockets, at most 64, may be mid-handshake, all of
        # them from one address: a host opening many connections at once (a busy wallet,
        # several peers behind one NAT) is not cut, and when the budget is full the address
        # holding the most loses its oldest first anyway.
        handshakes = p.read(table.integer, "max_handshakes", minimum=1, maximum=100_000,
                            default=max(1, min(defaults.max_handshakes,
                                               (max_connections or 1024) // 4)))
        config = cls(
            listen_host=listen[0] if listen else "",
            listen_port=listen[1] if listen else 0,
            data_dir=p.read(table.path, "data_dir", base),
            noise_key_file=p.read(table.path, "noise_key_file", base),
            idle_timeout=p.read(table.number, "idle_timeout", minimum=1, maximum=86400,
                                default=300),
            max_connections=max_connections,
            log_level=log_level,
            requests_per_second=p.read(table.number, "requests_per_second", minimum=0.001,
                                       maximum=1_000_000, default=requests_per_second),
            max_handshakes=handshakes,
            max_handshakes_per_address=p.read(
                table.integer, "max_handshakes_per_address", minimum=1, maximum=100_000,
                default=handshakes or 1),
            max_connections_per_peer=p.read(
                table.integer, "max_connections_per_peer", minimum=1, maximum=100_000,
                default=defaults.max_connections_per_peer),
            write_timeout=p.read(table.number, "write_timeout", minimum=1, maximum=86400,
                                 default=defaults.write_timeout),
            log_format=log_format,
            metrics_listen=p.read(table.listen, "metrics_listen", None),
        )
        for key, value, bound_key, bound in (
                ("max_handshakes", config.max_handshakes, "max_connections",
                 config.max_connections),
                ("max_handshakes_per_address", config.max_handshakes_per_address,
                 "max_handshakes", config.max_handshakes)):
            if None not in (value, bound) and value > bound:
                p.add(f"{table.key_name(key)}: must be at most {bound_key} ({bound}), "
                      f"got {value}")
        p.finish()
        return config

    def server_limits(self) -> ServerLimits:
        return ServerLimits(idle_timeout=self.idle_timeout,
                            max_connections=self.max_connections,
                            max_handshakes=self.max_handshakes,
                            max_handshakes_per_address=self.max_handshakes_per_address,
                            max_connections_per_peer=self.max_connections_per_peer,
                            write_timeout=self.write_timeout)


class Service(Protocol):
    """What a daemon serves. Built once the config is valid; closed on stop."""

    dispatcher: Dispatcher
    known_peers: list[bytes]

    def roles_of(self, peer_public: bytes) -> frozenset[str]: ...

    async def close(self) -> None: ...


class HasCommon(Protocol):
    common: CommonConfig


AppConfig = TypeVar("AppConfig", bound=HasCommon)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the fields of a text line: time (as the text line
    writes it), level, logger, message, and the traceback as `exception` when there is
    one. ASCII-escaped, so a record holding any string is still one valid line."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record), "level": record.levelname,
                "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=True)


def setup_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosqlite logs every statement with its parameters at debug: that would copy every
    # stored signature into the journal and drown the daemon's own lines.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, root.level))


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        log.warning("sd_notify(%s) failed: %s", state, e)


def ensure_data_dir(path: Path) -> None:
    """Create the data directory 0700 if missing; refuse one others can reach."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"data_dir: cannot create {path}: {e.strerror}") from None
    info = path.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"data_dir: {path} is not a directory")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"data_dir: {path} is open to group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run chmod 700 on it")


def check_descriptor_limit(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; refuse a max_connections it cannot
    hold (plus FD_MARGIN). Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep the soft limit we have; the check below uses it
    if soft != resource.RLIM_INFINITY and max_connections + FD_MARGIN > soft:
        raise ConfigError(
            f"max_connections: {max_connections} connections plus {FD_MARGIN} descriptors "
            f"for the daemon's own files exceed the open-file limit of {soft}; lower "
            f"max_connections to at most {max(0, soft - FD_MARGIN)} or raise the limit "
            f"(LimitNOFILE= in the systemd unit)")
    return soft


def load_app_config(
    name: str, config_path: Path, read_config: Callable[[ConfigTable, Path], AppConfig],
) -> AppConfig:
    table = load_config_file(config_path)
    base = Path(config_path).resolve().parent
    problems: list[str] = []
    try:
        config = read_config(table, base)
    except ConfigError as e:
        problems.extend(e.problems)
    # Unknown keys are reported even when a known one is bad: one round trip to fix all.
    problems.extend(f"{key}: unknown key" for key in table.unknown_keys())
    if problems:
        raise ConfigError(problems)
    return config


StatusReader = Callable[[Any, sqlite3.Connection | None], Awaitable[dict[str, Any]]]
"""`status(config, db)`: a daemon's own summary, from its database opened read-only.

Returns a dict of JSON values (nested dicts for sections); it is printed as indented
`key: value` lines, or as JSON with --json. Raise sqlite3.Error or StorageError when
the database cannot be read. `db` is None when the database is no file of data_dir
(`DatabaseName` said None): the reader then connects to it itself, read-only, and
returns its `database` entry (where, schema version) within the summary.
"""

DatabaseName = str | Callable[[Any], str | None]
"""The daemon's database file in data_dir, or a function of the config giving it (None:
the database lives elsewhere, e.g. on a PostgreSQL server)."""


Command = Callable[[Any], Awaitable[int]]
"""A one-shot subcommand: `command(config)` with the validated config; its exit status."""


def run_daemon(
    name: str,
    argv: list[str] | None,
    read_config: Callable[[ConfigTable, Path], AppConfig],
    make_service: Callable[[AppConfig, bytes], Awaitable[Service]],
    *,
    database_name: DatabaseName | None = None,
    status: StatusReader | None = None,
    commands: Mapping[str, Command] | None = None,
) -> int:
    """Entry point body of `revault-<name>`; returns the process exit status.

    With `database_name` and `status`, `revault-<name> --config FILE status [--json]`
    prints a summary of the daemon's database and whether it accepts connections,
    touching nothing. Each of `commands` runs as `revault-<name> --config FILE COMMAND`
    instead of the daemon, with the data directory made and logging set up.
    """
    prog = f"revault-{name}"
    parser = argparse.ArgumentParser(prog=prog, description=f"Revault {name} daemon.")
    parser.add_argument("--config", required=True, type=Path, help="TOML configuration file")
    commands = dict(commands or {})
    if status is not None or commands:
        subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
        if status is not None:
            status_parser = subparsers.add_parser(
                "status", help="summarize the database and whether the daemon accepts "
                               "connections, then exit (does not start the daemon)")
            status_parser.add_argument("--json", action="store_true", help="print JSON")
        for command in sorted(commands):
            subparsers.add_parser(command, help="run this command instead of the daemon")
    args = parser.parse_args(argv)
    command = getattr(args, "command", None)

    try:
        config = load_app_config(name, args.config, read_config)
        if command == "status":
            return _print_status(prog, name, args, config, database_name, status)
        check_descriptor_limit(config.common.max_connections)
        ensure_data_dir(config.common.data_dir)
        if command is not None:
            setup_logging(config.common.log_level, config.common.log_format)
            return asyncio.run(commands[command](config))
        noise_private = read_key_file(config.common.noise_key_file)
    except ConfigError as e:
        for problem in e.problems:
            print(f"{prog}: config: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyFileError as e:
        print(f"{prog}: noise_key_file: {e}", file=sys.stderr)
        return EXIT_CONFIG

    setup_logging(config.common.log_level, config.common.log_format)
    try:
        return asyncio.run(_serve(name, config, noise_private, make_service))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


def _version() -> str:
    try:
        return importlib.metadata.version("revault")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


async def _serve(name: str, config: HasCommon, noise_private: bytes,
                 make_service: Callable[[AppConfig, bytes], Awaitable[Service]]) -> int:
    common = config.common
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    try:
        service = await make_service(config, noise_private)
    except (KeyFileError, ConfigError) as e:  # e.g. a daemon's own key file: fix the config
        log.error("cannot start %s: %s", name, e)
        return EXIT_CONFIG
    except (StorageError, OSError, sqlite3.Error) as e:
        log.error("cannot start %s: %s", name, storage_error_cause(e) or e)
        return EXIT_FAILURE

    limits = common.server_limits()
    peer_slots = limits.max_connections - limits.max_handshakes
    if peer_slots < len(service.known_peers):
        # Each configured peer is promised a connection whatever the others do.
        log.error("cannot start %s: max_connections - max_handshakes (%d) must be at least "
                  "the number of configured peers (%d)", name, peer_slots,
                  len(service.known_peers))
        await service.close()
        return EXIT_CONFIG
    pacer = RequestPacer(common.requests_per_second)

    async def handle(conn: NoiseConnection) -> None:
        caller = Caller(public_key=conn.peer_public, roles=service.roles_of(conn.peer_public))
        await serve_connection(conn, service.dispatcher, caller, pacer)

    try:
        server = await start_server(common.listen_host, common.listen_port, noise_private,
                                    service.known_peers, handle, limits)
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", common.listen_host, common.listen_port, e)
        await service.close()
        return EXIT_FAILURE
    listener = None
    if common.metrics_listen is not None:
        try:
            listener = await metrics.start_listener(*common.metrics_listen)
        except OSError as e:
            log.error("cannot listen on %s:%d (metrics_listen): %s", *common.metrics_listen, e)
            await server.close()
            await service.close()
            return EXIT_FAILURE

    metrics.COMMON.daemon_info.labels(name, _version()).set(1)
    metrics.COMMON.connections_open.set_function(lambda: server.connection_count)
    log.info("%s listening on %s:%d, noise public key %s", name, common.listen_host,
             server.port, noise_public_key(noise_private).hex())
    # STATUS carries the bound ports: with `listen = "HOST:0"` it is the only way to learn them.
    ready = f"READY=1\nSTATUS=listening on {common.listen_host}:{server.port}"
    if listener is not None:
        log.info("metrics on http://%s:%d/metrics", common.metrics_listen[0], listener.port)
        ready += f"; metrics on {common.metrics_listen[0]}:{listener.port}"
    _settle_garbage_collector()
    sd_notify(ready)
    await stop.wait()
    log.info("%s stopping", name)
    sd_notify("STOPPING=1")
    if listener is not None:
        await listener.close()
    await server.close()
    await service.close()
    log.info("%s stopped", name)
    return 0


# Net allocations of container objects between two collections of the youngest
# generation; Python's default is 700.
GC_GEN0_THRESHOLD = 10_000


def _settle_garbage_collector() -> None:
    """Once serving: what start-up built (modules, config, method tables) lives as long
    as the process, so the collector stops scanning it (gc.freeze), and the youngest
    generation is collected after GC_GEN0_THRESHOLD net allocations instead of 700.

    Measured on the sync server under bench/sync_server.py's mixed load (200 clients):
    with Python's defaults, about 1,100 young and 9 full collections per 11 s of CPU
    (2% of it), each full one a 20 ms pause of the event loop that every request in
    flight waits out; with these, one young collection in the same run. Requests
    leave no cyclic garbage behind (a collect() after 150,000 of them found 4,000
    objects, from the 2,000 connections closed meanwhile), so collecting less often
    does not let memory grow: connections closing still trigger a collection every
    few thousand.
    """
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_GEN0_THRESHOLD), gen1, gen2)


# --- status ----------------------------------------------------------------------------

def _print_status(prog: str, name: str, args: argparse.Namespace, config: HasCommon,
                  database_name: DatabaseName, read_status: StatusReader) -> int:
    try:
        report = asyncio.run(collect_status(name, config, database_name, read_status))
    except (sqlite3.Error, StorageError, OSError) as e:
        print(f"{prog}: status: cannot read the database: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(report, indent=2) if args.json else "\n".join(format_status(report)))
    return 0


async def collect_status(name: str, config: HasCommon, database_name: DatabaseName,
                         read_status: StatusReader) -> dict[str, Any]:
    """The common part of `status` (config, liveness, database file) and the daemon's own."""
    common = config.common
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
        common.listen_host, common.listen_host)
    report: dict[str, Any] = {
        "daemon": name,
        "version": _version(),
        "listen": f"{common.listen_host}:{common.listen_port}",
        # Port 0 is chosen anew at each start: nothing to probe.
        "accepting_connections": (await _accepts(host, common.listen_port)
                                  if common.listen_port else None),
        "metrics_listen": (f"{common.metrics_listen[0]}:{common.metrics_listen[1]}"
                           if common.metrics_listen else None),
        "data_dir": str(common.data_dir),
    }
    file_name = database_name(config) if callable(database_name) else database_name
    section = name.replace("-", "_")
    if file_name is None:
        summary = await read_status(config, None)
        report["database"] = summary.pop("database")
        if summary:  # nothing more when the daemon never started on that database
            report[section] = summary
        return report
    path = common.data_dir / file_name
    if not path.exists():
        report["database"] = None  # never started with this data_dir
        return report
    db = open_read_only(path)
    try:
        report["database"] = {
            "path": str(path),
            "size_bytes": sum(p.stat().st_size for p in path.parent.glob(path.name + "*")),
            "schema_version": db.execute("PRAGMA user_version").fetchone()[0],
        }
        report[section] = await read_status(config, db)
    finally:
        db.close()
    return report


async def _accepts(host: str, port: int) -> bool:
    """Whether something accepts TCP connections there: connect, then close at once (the
    daemon counts it as an abandoned handshake)."""
    try:
        async with asyncio.timeout(STATUS_PROBE_TIMEOUT):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.transport.abort()
    return True


def format_status(report: dict[str, Any], indent: int = 0) -> list[str]:
    """`key: value` lines, sections indented (small ones on one line); None reads "-",
    booleans "yes"/"no"."""
    lines = []
    for key, value in report.items():
        label = " " * indent + key.replace("_", " ")
        if isinstance(value, dict) and _is_leaf(value):
            lines.append(f"{label}: " + (", ".join(
                f"{k}={_format_value(v)}" for k, v in value.items()) or "-"))
        elif isinstance(value, dict):
            lines.append(f"{label}:")
            lines.extend(format_status(value, indent + 2))
        else:
            lines.append(f"{label}: {_format_value(value)}")
    return lines


def _is_leaf(section: dict[str, Any]) -> bool:
    """A small section of plain values, printed on one line."""
    return len(section) <= 4 and not any(isinstance(v, (dict, list))
                                             for v in section.values())


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return str(value)
