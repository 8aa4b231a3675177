"""Spend policies, pure: each built-in rule, their combination, plugins, config errors."""

from __future__ import annotations

import hashlib

import coincurve
import pytest

from revault.config import ConfigError, ConfigTable
from revault.deployment import Deployment, p2wpkh, script_pubkey_to_address
from revault.primitives import OutPoint
from revault.transactions import Tx, TxIn, TxOut
from revault.watchtower_policy import (
    NO_RULE, Payee, Policy, PolicyConfig, SpendFacts, payees_of, read_policy,
)


def key(label: str) -> bytes:
    sk = hashlib.sha256(label.encode()).digest()
    return coincurve.PrivateKey(sk).public_key.format(compressed=True)


DEPLOYMENT = Deployment.from_dict({
    "network": "regtest", "stakeholders": [key("s0").hex(), key("s1").hex()],
    "managers": [key("m0").hex()], "cosigners": [], "cpfp_keys": [key("c0").hex()],
    "unvault_csv": 6,
    "emergency_address": script_pubkey_to_address(p2wpkh(key("e")), "regtest"),
})
ALICE = script_pubkey_to_address(p2wpkh(key("alice")), "regtest")
BOB = script_pubkey_to_address(p2wpkh(key("bob")), "regtest")


def spend(*outputs: tuple[str | bytes, int]) -> Tx:
    outs = tuple(TxOut(v, s if isinstance(s, bytes) else TxOut.to_address(s, 0, "regtest")
                       .script_pubkey) for s, v in outputs)
    return Tx(2, (TxIn(OutPoint("aa" * 32, 0), 6),), outs, 0)


def facts(tx: Tx, accepted_last_24h: int = 0) -> SpendFacts:
    internal = {DEPLOYMENT.deposit_script_pubkey(0)}
    return SpendFacts(tx, (), payees_of(tx, internal, "regtest"), accepted_last_24h)


def judge(config: PolicyConfig, f: SpendFacts, plugins=None) -> tuple[bool, str]:
    return Policy(config, DEPLOYMENT, plugins or {}).judge(f)


def test_default_refuses_everything():
    assert judge(PolicyConfig(), facts(spend((ALICE, 1000)))) == (False, NO_RULE)


def test_accept_all():
    accepted, reason = judge(PolicyConfig(accept_all=True), facts(spend((ALICE, 10**8))))
    assert accepted and "accept_all" in reason


def test_payees_exclude_change_to_a_deposit_script():
    f = facts(spend((ALICE, 3000), (DEPLOYMENT.deposit_script_pubkey(0), 50_000)))
    assert f.payees == (Payee(ALICE, 3000),) and f.payees_value == 3000


def test_max_value():
    config = PolicyConfig(max_value=5000)
    assert judge(config, facts(spend((ALICE, 5000))))[0]
    accepted, reason = judge(config, facts(spend((ALICE, 3000), (BOB, 2001))))
    assert not accepted and "5001 sat" in reason and "max_value 5000" in reason


def test_max_value_per_day_counts_what_was_accepted():
    config = PolicyConfig(max_value_per_day=10_000)
    assert judge(config, facts(spend((ALICE, 4000)), accepted_last_24h=6000))[0]
    accepted, reason = judge(config, facts(spend((ALICE, 4001)), accepted_last_24h=6000))
    assert not accepted and "max_value_per_day 10000" in reason


def test_allowed_addresses():
    config = PolicyConfig(allowed_addresses=(ALICE,))
    assert judge(config, facts(spend((ALICE, 4000))))[0]
    accepted, reason = judge(config, facts(spend((ALICE, 4000), (BOB, 1000))))
    assert not accepted and reason == f"destination {BOB} not allowed"


def test_every_configured_rule_must_accept():
    config = PolicyConfig(accept_all=True, max_value=1000)
    assert not judge(config, facts(spend((ALICE, 1001))))[0]
    accepted, reason = judge(config, facts(spend((ALICE, 1000))))
    assert accepted and reason == "accepted by accept_all, max_value"


def test_plugins_decide_and_a_raising_plugin_refuses():
    seen = []

    def only_small(vaults, tx, deployment):
        seen.append((vaults, tx.txid, deployment))
        return sum(o.value for o in tx.outputs) < 2000, "too big for the plugin"

    def broken(vaults, tx, deployment):
        raise RuntimeError("database down")

    config = PolicyConfig(plugins=("small",))
    f = facts(spend((ALICE, 1000)))
    assert judge(config, f, {"small": only_small})[0]
    assert seen == [((), f.spend.txid, DEPLOYMENT)]
    assert judge(config, facts(spend((ALICE, 3000))), {"small": only_small}) == (
        False, "policy plugin small refused: too big for the plugin")
    accepted, reason = judge(PolicyConfig(plugins=("broken",)), f, {"broken": broken})
    assert not accepted and reason == "policy plugin broken raised RuntimeError: database down"
    # Anything but True is a refusal (a plugin returning None by mistake refuses).
    assert not judge(config, f, {"small": lambda *a: None})[0]


def test_config_reading_and_errors():
    config = read_policy(ConfigTable({"max_value": 5, "allowed_addresses": [ALICE]}, "policy"),
                         "regtest")
    assert config == PolicyConfig(max_value=5, allowed_addresses=(ALICE,))
    assert read_policy(ConfigTable({}, "policy"), "regtest") == PolicyConfig()
    with pytest.raises(ConfigError) as e:
        read_policy(ConfigTable({"max_value": -1, "allowed_addresses": ["nope"],
                                 "plugins": ["no-such-plugin"]}, "policy"), "regtest")
    problems = "\n".join(e.value.problems)
    assert "policy.max_value: must be at least 0" in problems
    assert "policy.allowed_addresses[0]: not a regtest address" in problems
    assert "policy.plugins[0]: no entry point 'no-such-plugin'" in problems


def test_limits_count_the_fee_and_the_cpfp_output_as_value_leaving_the_vaults():
    """A thief holding the managers' keys pays 1,000 sat to a payee and the rest of the
    vault to a miner (fee) or to the hot CPFP keys: not a 1,000 sat spend."""
    cpfp = DEPLOYMENT.cpfp_script_pubkey(0)
    deposit = DEPLOYMENT.deposit_script_pubkey(0)
    internal = {deposit, cpfp}
    per_spend, per_day = PolicyConfig(max_value=10_000), PolicyConfig(max_value_per_day=10_000)
    for tx in (spend((ALICE, 1000)),                          # 999,000 sat of fee
               spend((cpfp, 989_000), (ALICE, 1000))):         # the CPFP output inflated
        f = SpendFacts(tx, (), payees_of(tx, internal, "regtest"), 0, spent_value=1_000_000)
        assert f.payees_value == 1000
        for config in (per_spend, per_day):
            accepted, reason = judge(config, f)
            assert not accepted and "pays 1000000 sat" in reason, reason
    # Change back to a deposit script stays in the vaults; a plain spend is its payees,
    # fee and CPFP output.
    tx = spend((cpfp, 16_000), (ALICE, 5000), (deposit, 975_000))
    f = SpendFacts(tx, (), payees_of(tx, internal, "regtest"), 0, spent_value=1_000_000,
                   returned_value=975_000)
    assert f.value_out == 25_000
    assert judge(PolicyConfig(max_value=25_000), f)[0]
    assert not judge(PolicyConfig(max_value=24_999), f)[0]
