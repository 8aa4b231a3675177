"""The regtest fixture works: a node answers both RPC paths, mines and confirms."""

from __future__ import annotations

from decimal import Decimal

import pytest

from revault.bitcoind import BitcoindClient, BitcoindError, BitcoindUnreachable
from tests.support.regtest import RegtestNode


async def test_mine_send_confirm(bitcoind: RegtestNode) -> None:
    info = await bitcoind.rpc("getblockchaininfo")
    assert info["chain"] == "regtest"
    assert info["blocks"] >= 101
    assert bitcoind.cli("getblockcount") == info["blocks"]

    balance = await bitcoind.rpc("getbalance", wallet=bitcoind.MINER_WALLET)
    assert isinstance(balance, Decimal) and balance > 0

    receiver = bitcoind.new_wallet("test_regtest_receiver")
    txid = await bitcoind.rpc(
        "sendtoaddress", receiver, Decimal("1.23456789"), wallet=bitcoind.MINER_WALLET
    )
    bitcoind.sync_wallets()
    unconfirmed = await bitcoind.rpc("gettransaction", txid, wallet="test_regtest_receiver")
    assert unconfirmed["confirmations"] == 0
    assert unconfirmed["amount"] == Decimal("1.23456789")

    blocks = bitcoind.mine(1)
    confirmed = await bitcoind.rpc("gettransaction", txid, wallet="test_regtest_receiver")
    assert confirmed["confirmations"] >= 1
    assert confirmed["blockhash"] == blocks[0]


async def test_rpc_errors_and_credentials(bitcoind: RegtestNode) -> None:
    with pytest.raises(BitcoindError) as block_missing:
        await bitcoind.rpc("getblock", "00" * 32)
    assert block_missing.value.code == -5  # RPC_INVALID_ADDRESS_OR_KEY

    with pytest.raises(BitcoindError) as wallet_missing:
        await bitcoind.rpc("getbalance", wallet="no-such-wallet")
    assert wallet_missing.value.code == -18  # RPC_WALLET_NOT_FOUND

    wrong = BitcoindClient(bitcoind.rpc_port, user=bitcoind.rpc_user, password="wrong", timeout=10)
    with pytest.raises(BitcoindUnreachable, match="credentials"):
        await wrong.call("getblockcount")

    cookie_less = BitcoindClient(bitcoind.rpc_port, cookie_file=bitcoind.datadir / "nope", timeout=10)
    with pytest.raises(BitcoindUnreachable, match="cookie"):
        await cookie_less.call("getblockcount")


async def test_client_timeout_and_chunked_reply() -> None:
    """The client bounds a silent server and reads a chunked body (no bitcoind needed)."""
    import asyncio

    replies: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if replies:
            writer.write(replies.pop())
            await writer.drain()
            writer.close()
        else:
            await reader.read()  # say nothing until the client gives up

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = BitcoindClient(port, user="u", password="p", timeout=0.3)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(BitcoindUnreachable, match="within 0.3s"):
            await client.call("getblockcount")
        assert loop.time() - started < 5

        body = b'{"result":{"fee":0.00000253},"error":null,"id":2}'
        half = len(body) // 2
        replies.append(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{half:x}\r\n".encode() + body[:half] + b"\r\n"
            + f"{len(body) - half:x}\r\n".encode() + body[half:] + b"\r\n0\r\n\r\n"
        )
        assert await client.call("getmempoolentry") == {"fee": Decimal("0.00000253")}

        replies.append(
            b'HTTP/1.1 500 Internal Server Error\r\nContent-Length: 63\r\n\r\n'
            b'{"result":null,"error":{"code":-26,"message":"dust"},"id":3}   '
        )
        with pytest.raises(BitcoindError) as err:
            await client.call("sendrawtransaction", "00")
        assert (err.value.code, err.value.message) == (-26, "dust")
    finally:
        server.close()
        await server.wait_closed()
