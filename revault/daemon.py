"""What every revault daemon shares: config, keys, data dir, logs, listen, sd_notify, signals.

A daemon module provides two things to `run_daemon`: a function that reads its own
config keys from the TOML table (next to the common ones read here), and a coroutine
that builds its `Service` (dispatcher, peers and roles, storage). Everything else
(parsing `--config`, refusing bad configs before anything starts, the data directory,
the Noise server, READY=1, a clean stop on SIGTERM/SIGINT) lives here once.
"""

from __future__ import annotations

import argparse
import asyncio
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
from typing import Awaitable, Callable, Mapping, Protocol, TypeVar

from revault.config import ConfigError, ConfigTable, ProblemCollector, load_config_file
from revault.keys import KeyFileError, noise_public_key, read_key_file
from revault.rpc import Caller, Dispatcher, RequestPacer, serve_connection
from revault.storage import StorageError, storage_error_cause
from revault.transport import NoiseConnection, ServerLimits, start_server

LOG_LEVELS = ("debug", "info", "warning", "error")
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


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
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


def run_daemon(
    name: str,
    argv: list[str] | None,
    read_config: Callable[[ConfigTable, Path], AppConfig],
    make_service: Callable[[AppConfig, bytes], Awaitable[Service]],
    commands: Mapping[str, Callable[[AppConfig], Awaitable[int]]] | None = None,
) -> int:
    """Entry point body of `revault-<name>`; returns the process exit status.

    `commands`: one-shot subcommands (`revault-<name> --config FILE COMMAND`) run
    with the validated config instead of the daemon; each returns the exit status.
    """
    prog = f"revault-{name}"
    parser = argparse.ArgumentParser(prog=prog, description=f"Revault {name} daemon.")
    parser.add_argument("--config", required=True, type=Path, help="TOML configuration file")
    if commands:
        parser.add_argument("command", nargs="?", choices=sorted(commands),
                            help="run this command instead of the daemon")
    args = parser.parse_args(argv)

    try:
        config = load_app_config(name, args.config, read_config)
        check_descriptor_limit(config.common.max_connections)
        ensure_data_dir(config.common.data_dir)
        if commands and args.command:
            setup_logging(config.common.log_level)
            return asyncio.run(commands[args.command](config))
        noise_private = read_key_file(config.common.noise_key_file)
    except ConfigError as e:
        for problem in e.problems:
            print(f"{prog}: config: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyFileError as e:
        print(f"{prog}: noise_key_file: {e}", file=sys.stderr)
        return EXIT_CONFIG

    setup_logging(config.common.log_level)
    try:
        return asyncio.run(_serve(name, config, noise_private, make_service))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


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

    log.info("%s listening on %s:%d, noise public key %s", name, common.listen_host,
             server.port, noise_public_key(noise_private).hex())
    # STATUS carries the bound port: with `listen = "HOST:0"` it is the only way to learn it.
    sd_notify(f"READY=1\nSTATUS=listening on {common.listen_host}:{server.port}")
    await stop.wait()
    log.info("%s stopping", name)
    sd_notify("STOPPING=1")
    await server.close()
    await service.close()
    log.info("%s stopped", name)
    return 0
