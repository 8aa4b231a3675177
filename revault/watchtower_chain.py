"""Following Bitcoin Core's chain and mempool for the guard: blocks, reorgs, mempool.

Thin: this turns RPC answers (and ZMQ messages) into the guard's events. Blocks are
read raw and parsed here, so a block costs one RPC and one parse whatever the number of
vaults; the guard matches each transaction by outpoint.

- Blocks: from the last processed (height, hash) to the node's tip. When that hash is no
  longer on the node's chain, the follower steps back to the fork, tells the guard that
  what was mined above it is unmined again, and reads the new branch.
- Start: the guard's sightings live in memory, so a start re-reads the last
  `rescan_depth` blocks before the stored tip (enough to see any unvault still within
  reach of a cancel, and any revocation not yet buried deep enough to retire a vault).
- Mempool: the txids are listed at each poll; new ones are fetched and shown to the
  guard, and the guard forgets unmined sightings of transactions no longer there.
- ZMQ (`rawtx`, `rawblock`, or `sequence`): a transaction is shown to the guard as soon
  as the node publishes it; a block or removal wakes the poll loop at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from bitcoin.core import CBlock, CTransaction

from revault.bitcoind import BitcoindClient, BitcoindError
from revault.watchtower_guard import ChainTx, Guard, GuardedVault, chain_tx_from_bitcoinlib

log = logging.getLogger("revault.watchtower.chain")

RPC_INVALID_ADDRESS_OR_KEY = -5  # e.g. a mempool transaction gone in between
MEMPOOL_FETCH_BATCH = 8  # getrawtransaction calls in flight at once


class ChainFollower:
    def __init__(self, node: BitcoindClient, guard: Guard, *, rescan_depth: int):
        self.node = node
        self.guard = guard
        self.rescan_depth = rescan_depth
        self.tip: tuple[int, str] | None = None
        self.hashes: dict[int, str] = {}  # height -> hash of the blocks we processed, recent
        self.mempool: set[str] = set()
        self.started = False

    async def start(self, stored_tip: tuple[int, str] | None) -> None:
        """Rebuild the guard's sightings from the recent chain and the mempool."""
        best = await self.node.call("getblockcount")
        first = best if stored_tip is None else min(best, stored_tip[0])
        first = max(0, first - self.rescan_depth)
        for height in range(first, best + 1):
            await self._connect(height, await self.node.call("getblockhash", height))
        self.mempool = set()
        await self.sync_mempool()
        self.started = True
        log.info("following the chain from block %d (%s), %d vaults guarded, %d with an "
                 "unvault in flight", self.tip[0], self.tip[1], len(self.guard),
                 len(self.guard.busy))

    async def _connect(self, height: int, block_hash: str) -> list[GuardedVault]:
        raw = await self.node.call("getblock", block_hash, 0)
        count, touched = see_block(self.guard, bytes.fromhex(raw), height)
        self.tip = (height, block_hash)
        self.hashes[height] = block_hash
        self.hashes.pop(height - self.rescan_depth, None)
        log.debug("block %d %s: %d transactions, %d vault(s) touched", height, block_hash,
                  count, len(touched))
        return touched

    async def sync_blocks(self) -> bool:
        """Catch up with the node's tip; True when the tip changed."""
        assert self.tip is not None
        best_hash = await self.node.call("getbestblockhash")
        if best_hash == self.tip[1]:
            return False
        height = self.tip[0]
        # Step back to the last block of ours still on the node's chain (a reorg deeper
        # than the blocks we remember is taken to fork there: rereading more is harmless).
        while height > 0 and height in self.hashes \
                and await self._hash_at(height) != self.hashes[height]:
            height -= 1
        if height < self.tip[0]:
            block_hash = await self.node.call("getblockhash", height)
            log.warning("reorg: blocks %d..%d left the chain; rereading from %d", height + 1,
                        self.tip[0], height + 1)
            self.guard.disconnect_above(height)
            self.tip = (height, block_hash)
        best = await self.node.call("getblockcount")
        for h in range(height + 1, best + 1):
            await self._connect(h, await self.node.call("getblockhash", h))
        return True

    async def _hash_at(self, height: int) -> str | None:
        try:
            return await self.node.call("getblockhash", height)
        except BitcoindError:
            return None  # above the node's tip (it rolled back further than us)

    async def sync_mempool(self) -> list[GuardedVault]:
        txids = set(await self.node.call("getrawmempool"))
        touched = self.guard.mempool_is(txids)
        new = list(txids - self.mempool)
        # A few calls at once (bitcoind serves RPCs on several threads): at start, a
        # full mainnet mempool is tens of thousands of transactions to read.
        for start in range(0, len(new), MEMPOOL_FETCH_BATCH):
            batch = new[start:start + MEMPOOL_FETCH_BATCH]
            raws = await asyncio.gather(*(self._mempool_tx(txid) for txid in batch))
            for txid, raw in zip(batch, raws):
                if raw is None:
                    txids.discard(txid)  # left the mempool since it was listed
                else:
                    touched += self.see_raw(bytes.fromhex(raw))
        self.mempool = txids
        return touched

    async def _mempool_tx(self, txid: str) -> str | None:
        try:
            return await self.node.call("getrawtransaction", txid)
        except BitcoindError as e:
            if e.code == RPC_INVALID_ADDRESS_OR_KEY:
                return None
            raise

    def see_raw(self, raw: bytes, height: int | None = None) -> list[GuardedVault]:
        tx = chain_tx_from_bitcoinlib(CTransaction.deserialize(raw))
        if height is None:
            self.mempool.add(tx.txid)
        return self.guard.see(tx, height)

    def see(self, tx: ChainTx) -> list[GuardedVault]:
        """One of our own broadcasts, entering the mempool."""
        self.mempool.add(tx.txid)
        return self.guard.see(tx, None)


def see_block(guard: Guard, raw: bytes, height: int) -> tuple[int, list[GuardedVault]]:
    """Show every transaction of a serialized block to the guard; (transactions in the
    block, vaults touched). One parse, then one lookup per input."""
    block = CBlock.deserialize(raw)
    touched = []
    for ctx in block.vtx[1:]:  # the coinbase spends nothing
        touched += guard.see(chain_tx_from_bitcoinlib(ctx), height)
    return len(block.vtx), touched


class ZmqListener:
    """Bitcoin Core's ZMQ publisher: transactions to the guard at once, blocks and
    removals as a wake-up of the poll loop. pyzmq's asyncio sockets, one SUB socket per
    endpoint."""

    def __init__(self, endpoints: dict[str, str], follower: ChainFollower,
                 on_touched: Callable[[list[GuardedVault]], None],
                 wake: Callable[[], None]):
        self.endpoints = endpoints  # topic -> tcp://host:port
        self.follower = follower
        self.on_touched = on_touched
        self.wake = wake

    async def run(self) -> None:
        import zmq
        import zmq.asyncio

        context = zmq.asyncio.Context()
        sockets = []
        try:
            by_address: dict[str, list[str]] = {}
            for topic, address in self.endpoints.items():
                by_address.setdefault(address, []).append(topic)
            for address, topics in by_address.items():
                sock = context.socket(zmq.SUB)
                sock.setsockopt(zmq.RCVHWM, 0)  # never drop a notification ourselves
                for topic in topics:
                    sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
                sock.connect(address)
                sockets.append(sock)
                log.info("ZMQ: subscribed to %s at %s", ", ".join(topics), address)
            await asyncio.gather(*(self._read(s) for s in sockets))
        finally:
            for s in sockets:
                s.close(linger=0)
            context.term()

    async def _read(self, sock) -> None:
        while True:
            parts = await sock.recv_multipart()
            if len(parts) < 2:
                continue
            topic, body = parts[0], parts[1]
            try:
                self._handle(topic, body)
            except Exception:
                # A message we cannot read must not stop the listener: polling still
                # covers what it would have told us.
                log.exception("ZMQ: cannot handle a %r message", topic[:16])

    def _handle(self, topic: bytes, body: bytes) -> None:
        if topic == b"rawtx":
            if not self.follower.started:
                return
            touched = self.follower.see_raw(body)
            if touched:
                self.on_touched(touched)
        elif topic == b"rawblock":
            self.wake()
        elif topic == b"sequence":
            # <32-byte hash><label>[<8-byte mempool sequence>]: A(dded), R(emoved)
            # transactions, C(onnected), D(isconnected) blocks.
            # The poll loop reads the mempool and the tip on waking.
            self.wake()
