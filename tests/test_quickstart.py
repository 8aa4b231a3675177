"""The README's main job: a sync server on a generated config, reachable as it says."""

import subprocess
import sys

from revault.keys import read_key_file
from revault.rpc import RpcClient
from tests.support.daemons import REPO_ROOT, DaemonProcess


async def test_generated_config_serves_its_generated_clients(daemon_dir):
    directory = daemon_dir / "demo"
    prepared = subprocess.run(
        [sys.executable, "-m", "revault.quickstart", str(directory), "--listen", "127.0.0.1:0",
         "--prepare-only"], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert prepared.returncode == 0, prepared.stderr
    assert "RpcClient.connect" in prepared.stdout
    server_public = bytes.fromhex(
        prepared.stdout.split("noise public key:")[1].split()[0])

    daemon = DaemonProcess("sync-server", directory / "sync-server.toml", daemon_dir)
    try:
        await daemon.start()
        both = read_key_file(directory / "stakeholder-manager.key")
        async with await RpcClient.connect("127.0.0.1", daemon.port, both, server_public) as rpc:
            assert await rpc.call("get_sigs", {"id": "00" * 32}) == {"signatures": {}}
            opinions = await rpc.call("get_spend_opinions", {"vault_id": "00" * 32})
            assert isinstance(opinions.pop("cursor"), str)
            assert opinions == {"vault_id": "00" * 32, "opinions": []}
        tower = read_key_file(directory / "watchtower.key")
        async with await RpcClient.connect("127.0.0.1", daemon.port, tower, server_public) as rpc:
            requests = await rpc.call("get_spend_requests", {})
            assert isinstance(requests.pop("cursor"), str)
            assert requests == {"requests": []}
        assert await daemon.stop() == 0
    finally:
        daemon.ensure_dead()

    # A second run reuses the keys the clients were given.
    again = subprocess.run(
        [sys.executable, "-m", "revault.quickstart", str(directory), "--prepare-only"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert again.returncode == 0
    assert server_public.hex() in again.stdout
    assert read_key_file(directory / "stakeholder-manager.key") == both
