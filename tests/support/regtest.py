"""A throwaway Bitcoin Core regtest node for end-to-end tests.

The binaries come from `contrib/get-bitcoind.sh` (asked once per test session). A
missing or broken bitcoind is an error, never a skip: CI must not go green without
having run the regtest tests.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from decimal import Decimal
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from revault.bitcoind import BitcoindClient
from revault.primitives import OutPoint
from revault.transactions import Coin
from tests.support import markers

REPO = Path(__file__).resolve().parents[2]
GET_BITCOIND = REPO / "contrib" / "get-bitcoind.sh"

START_TIMEOUT = 60.0  # seconds for RPC to answer after exec (cold disk, slow CI)
STOP_TIMEOUT = 30.0
CLI_TIMEOUT = 60.0

_bin_dir: Path | None = None


class RegtestError(RuntimeError):
    pass


def bitcoind_bin_dir(show_progress: bool = False) -> Path:
    """The directory holding bitcoind and bitcoin-cli (asked to the script once).

    With `show_progress`, the script's stderr (a build's progress) goes to ours as it
    comes instead of being kept for the error message.
    """
    global _bin_dir
    if _bin_dir is None:
        proc = subprocess.run(
            ["bash", str(GET_BITCOIND)], stdout=subprocess.PIPE,
            stderr=None if show_progress else subprocess.PIPE, text=True, timeout=3600
        )
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or "(shown above)").splitlines()[-20:])
            raise RegtestError(
                f"contrib/get-bitcoind.sh failed (exit {proc.returncode}); "
                f"set BITCOIND to a bitcoind binary. Its stderr ends with:\n{tail}"
            )
        lines = proc.stdout.strip().splitlines()
        if not lines:
            raise RegtestError("contrib/get-bitcoind.sh printed no directory")
        path = Path(lines[-1])
        for name in ("bitcoind", "bitcoin-cli"):
            if not os.access(path / name, os.X_OK):
                raise RegtestError(f"contrib/get-bitcoind.sh gave {path}, which has no {name}")
        _bin_dir = path
    return _bin_dir


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def btc(sats: int) -> Decimal:
    return (Decimal(sats) / Decimal(100_000_000)).quantize(Decimal("0.00000001"))


def sats(amount: Decimal | str | int) -> int:
    value = Decimal(amount) * 100_000_000
    if value != value.to_integral_value():
        raise ValueError(f"{amount} BTC is not a whole number of satoshis")
    return int(value)


class RegtestNode:
    """One bitcoind process on regtest with its own datadir, ports and credentials.

    `rpc()` goes through revault.bitcoind (the code under test elsewhere); `cli()` goes
    through bitcoin-cli, an independent path useful to cross-check it.
    """

    MINER_WALLET = "miner"

    def __init__(self, datadir: Path, bin_dir: Path | None = None, extra_conf: Sequence[str] = ()):
        self.bin_dir = bin_dir if bin_dir is not None else bitcoind_bin_dir()
        self.datadir = Path(datadir)
        self.extra_conf = tuple(extra_conf)  # more `key=value` lines for [regtest]
        self.rpc_user = "revault-" + secrets.token_hex(4)
        self.rpc_password = secrets.token_hex(16)
        self.rpc_port = 0
        self.p2p_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""  # the miner wallet's address, receives the coinbases
        self._log_file = None

    # --- lifecycle -----------------------------------------------------------------

    def start(self, attempts: int = 3) -> None:
        """Start bitcoind and wait (bounded) until RPC answers.

        The ports are picked just before exec, so another process may grab one in
        between; bitcoind then exits at once and we retry with new ports.
        """
        markers.check("regtest")
        self.datadir.mkdir(parents=True, exist_ok=True)
        last_error: Exception | None = None
        for _ in range(attempts):
            self.rpc_port, self.p2p_port = free_port(), free_port()
            self._write_conf()
            self._spawn()
            try:
                self._wait_ready()
                return
            except RegtestError as exc:
                last_error = exc
                self.stop()
                if "exited" not in str(exc):
                    break
        raise RegtestError(f"bitcoind did not start: {last_error}")

    def start_again(self, wallets: list[str]) -> None:
        """Start a stopped node on the same ports (its clients keep their configuration)
        and load `wallets` (what `listwallets` said before the stop)."""
        self._write_conf()
        self._spawn()
        self._wait_ready()
        for wallet in wallets:
            # A client that reconnects first (a watchtower loading its fee reserve)
            # may have loaded it already: the wallet is loaded either way.
            proc = self._run_cli(["loadwallet", wallet], check=False)
            if proc.returncode != 0 and "already loaded" not in proc.stderr:
                raise RegtestError(f"bitcoin-cli loadwallet failed: {proc.stderr.strip()}")

    def _write_conf(self) -> None:
        conf = self.datadir / "bitcoin.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(
                "regtest=1\n"
                "[regtest]\n"
                "server=1\n"
                "txindex=1\n"
                "fallbackfee=0.0002\n"
                # P2P on loopback only: reachable by a second test node, never
                # from outside, and no onion listener.
                "listen=1\n"
                "listenonion=0\n"
                "discover=0\n"
                f"bind=127.0.0.1:{self.p2p_port}\n"
                f"rpcport={self.rpc_port}\n"
                "rpcbind=127.0.0.1\n"
                "rpcallowip=127.0.0.1\n"
                f"rpcuser={self.rpc_user}\n"
                f"rpcpassword={self.rpc_password}\n"
                "dnsseed=0\n"
                "fixedseeds=0\n"
                "keypool=10\n"
                "printtoconsole=0\n"
                + "".join(f"{line}\n" for line in self.extra_conf)
            )

    def _spawn(self) -> None:
        self._log_file = open(self.datadir / "stdout.log", "ab")
        self.process = subprocess.Popen(
            [str(self.bin_dir / "bitcoind"), f"-datadir={self.datadir}"],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RegtestError(
                    f"bitcoind exited with status {self.process.returncode}: {self.log_tail()}"
                )
            proc = self._run_cli(["getblockchaininfo"], check=False, timeout=10)
            if proc.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RegtestError(
                    f"RPC not answering after {START_TIMEOUT}s: {proc.stderr.strip()}"
                )
            time.sleep(0.05)  # poll interval, bounded by the deadline above

    def stop(self) -> None:
        """Stop the node: RPC stop, then SIGTERM, then SIGKILL, each bounded."""
        proc, self.process = self.process, None
        try:
            if proc is None or proc.poll() is not None:
                return
            try:
                self._run_cli(["stop"], check=False, timeout=10)
                proc.wait(timeout=STOP_TIMEOUT)
                return
            except subprocess.TimeoutExpired:
                pass
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def log_tail(self, lines: int = 20) -> str:
        log = self.datadir / "regtest" / "debug.log"
        out = self.datadir / "stdout.log"
        text = ""
        for path in (out, log):
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    # --- talking to it ---------------------------------------------------------------

    def client(self, wallet: str | None = None, timeout: float = 60.0) -> BitcoindClient:
        return BitcoindClient(
            self.rpc_port,
            user=self.rpc_user,
            password=self.rpc_password,
            wallet=wallet,
            timeout=timeout,
        )

    async def rpc(self, method: str, *params: Any, wallet: str | None = None) -> Any:
        return await self.client(wallet).call(method, *params)

    def _run_cli(
        self, args: list[str], *, check: bool = True, timeout: float = CLI_TIMEOUT,
        wallet: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / "bitcoin-cli"), f"-datadir={self.datadir}"]
        if wallet is not None:
            cmd.append(f"-rpcwallet={wallet}")
        proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RegtestError(f"bitcoin-cli {' '.join(args[:1])} failed: {proc.stderr.strip()}")
        return proc

    def cli(self, method: str, *params: Any, wallet: str | None = None) -> Any:
        """Synchronous call through bitcoin-cli; JSON results are parsed (Decimals)."""
        args = [method]
        for p in params:
            if isinstance(p, str):
                args.append(p)
            else:
                args.append(json.dumps(p, default=str))
        out = self._run_cli(args, wallet=wallet).stdout.strip()
        try:
            return json.loads(out, parse_float=Decimal)
        except ValueError:
            return out

    def mine(self, n: int = 1, address: str | None = None) -> list[str]:
        """Mine `n` blocks; wallets have seen them when this returns."""
        blocks = self.cli("generatetoaddress", n, address or self.address)
        self.sync_wallets()
        return blocks

    def sync_wallets(self) -> None:
        """Wait until wallets have processed every block and mempool event so far
        (wallets learn of them asynchronously; this hidden RPC is Core's own barrier)."""
        self.cli("syncwithvalidationinterfacequeue")

    def setup_miner_wallet(self, blocks: int = 200) -> None:
        """Create the miner wallet and mature `blocks - 100` coinbases into it (many
        confirmed coins, so that test payments do not chain on unconfirmed change)."""
        self.cli("createwallet", self.MINER_WALLET)
        self.address = self.cli("getnewaddress", wallet=self.MINER_WALLET)
        self.mine(blocks)

    def new_wallet(self, name: str, fund: Decimal | None = None) -> str:
        """Create wallet `name`; optionally send it `fund` BTC (confirmed). Returns an address of it."""
        self.cli("createwallet", name)
        address = self.cli("getnewaddress", wallet=name)
        if fund is not None:
            self.cli("sendtoaddress", address, str(fund), wallet=self.MINER_WALLET)
            self.mine(1)
        return address


async def fund(node: RegtestNode, address: str, amount_sats: int, index: int = 0) -> Coin:
    """Send exactly `amount_sats` to `address` from the miner wallet (unconfirmed): the
    output that pays it, as a coin of vault index `index`."""
    txid = await node.rpc("sendtoaddress", address, btc(amount_sats), wallet=node.MINER_WALLET)
    tx = await node.rpc("getrawtransaction", txid, True)
    for out in tx["vout"]:
        if out["scriptPubKey"].get("address") == address and sats(out["value"]) == amount_sats:
            return Coin(OutPoint(txid, out["n"]), amount_sats, index)
    raise RegtestError(f"{txid} does not pay {amount_sats} sat to {address}")


def start_node(datadir: Path, extra_conf: Sequence[str] = ()) -> RegtestNode:
    """A started node with a funded miner wallet; stopped again if setup fails."""
    node = RegtestNode(datadir, extra_conf=extra_conf)
    try:
        node.start()
        node.setup_miner_wallet()
    except BaseException:
        node.stop()
        raise
    return node


def remove_datadir(node: RegtestNode) -> None:
    shutil.rmtree(node.datadir, ignore_errors=True)
