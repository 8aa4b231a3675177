"""Spend policies: whether this watchtower lets a manager's spend through.

Pure: the spend, the vaults it spends, the deployment and what was already accepted in
the last 24 hours in; a verdict out. The seed's default is to revault every unvaulting
attempt, so with no rule configured every spend is refused. With rules, a spend is
accepted only when every configured rule accepts it:

- `accept_all = true`
- `max_value = SAT`: what the spend pays to payees (outputs other than the CPFP output
  and change to a deposit script), and never less than what leaves the vaults: the
  value of the unvault outputs it spends minus its change to a deposit script (so a fee
  or a CPFP output inflated by a thief holding the managers' keys counts too);
- `max_value_per_day = SAT`: the same total over the spends accepted in the last 24 h,
  this one included;
- `allowed_addresses = [...]`: every payee is one of these addresses;
- `plugins = ["NAME", ...]`: entry points of group `revault.policies`, each a callable
  `policy(vaults, spend, deployment) -> bool | (bool, reason)`.

A plugin that raises refuses the spend (the exception is logged by the caller from the
verdict's reason).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from revault.config import ConfigError, ConfigTable, ProblemCollector
from revault.deployment import Deployment, address_to_script_pubkey, script_pubkey_to_address
from revault.transactions import Tx

PLUGIN_GROUP = "revault.policies"
MAX_SATS = 21_000_000 * 100_000_000
NO_RULE = "no spend policy configured: every spend is revaulted"

PluginFn = Callable[[Sequence[Any], Tx, Deployment], Any]


@dataclass(frozen=True)
class PolicyConfig:
    accept_all: bool = False
    max_value: int | None = None
    max_value_per_day: int | None = None
    allowed_addresses: tuple[str, ...] | None = None
    plugins: tuple[str, ...] = ()

    @property
    def has_rules(self) -> bool:
        return (self.accept_all or self.max_value is not None
                or self.max_value_per_day is not None or self.allowed_addresses is not None
                or bool(self.plugins))


def read_policy(table: ConfigTable, network: str | None) -> PolicyConfig:
    """The `[policy]` table (absent: the default, refuse everything)."""
    p = ProblemCollector()
    accept_all = p.read(table.boolean, "accept_all", False)
    max_value = p.read(table.integer, "max_value", minimum=0, maximum=MAX_SATS, default=None)
    per_day = p.read(table.integer, "max_value_per_day", minimum=0, maximum=MAX_SATS,
                     default=None)
    addresses = (p.read(table.string_list, "allowed_addresses")
                 if "allowed_addresses" in table else None)
    if addresses is not None and network is not None:
        for i, address in enumerate(addresses):
            try:
                address_to_script_pubkey(address, network)
            except ValueError as e:
                p.add(f"{table.key_name('allowed_addresses')}[{i}]: not a {network} "
                      f"address ({e})")
    plugins = p.read(table.string_list, "plugins", [])
    if plugins:
        available = {ep.name for ep in entry_points(group=PLUGIN_GROUP)}
        for i, name in enumerate(plugins):
            if name not in available:
                p.add(f"{table.key_name('plugins')}[{i}]: no entry point {name!r} in group "
                      f"{PLUGIN_GROUP} (installed: {', '.join(sorted(available)) or 'none'})")
    p.finish()
    return PolicyConfig(accept_all=bool(accept_all), max_value=max_value,
                        max_value_per_day=per_day,
                        allowed_addresses=tuple(addresses) if addresses is not None else None,
                        plugins=tuple(plugins or ()))


def load_plugins(names: Sequence[str]) -> dict[str, PluginFn]:
    found = {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP)}
    loaded = {}
    for name in names:
        if name not in found:
            raise ConfigError(f"policy.plugins: no entry point {name!r} in group {PLUGIN_GROUP}")
        loaded[name] = found[name].load()
    return loaded


@dataclass(frozen=True, slots=True)
class Payee:
    address: str | None  # None: a script with no standard address
    value: int


@dataclass(frozen=True, slots=True)
class SpendFacts:
    spend: Tx
    vaults: tuple[Any, ...]  # the guarded vaults whose unvault output it spends
    payees: tuple[Payee, ...]
    accepted_last_24h: int  # `value_out` total of the spends accepted in the last 24 h
    # What the guarded unvault outputs it spends are worth, and what it pays back to a
    # deposit script; None when unknown (then only the payees count).
    spent_value: int | None = None
    returned_value: int = 0

    @property
    def payees_value(self) -> int:
        return sum(p.value for p in self.payees)

    @property
    def value_out(self) -> int:
        """What the limits count: the payees' total, or more when more leaves the vaults.
        The fee and the CPFP output are not payees, but a spend paying 1,000 sat to a
        payee and the rest of a vault to a miner or to the (hot) CPFP keys must not pass
        a max_value as a 1,000 sat spend."""
        if self.spent_value is None:
            return self.payees_value
        return max(self.payees_value, self.spent_value - self.returned_value)


def payees_of(spend: Tx, internal_scripts: set[bytes], network: str) -> tuple[Payee, ...]:
    """The outputs that leave the deployment: not the CPFP output, not a deposit."""
    out = []
    for o in spend.outputs:
        if o.script_pubkey in internal_scripts:
            continue
        try:
            address = script_pubkey_to_address(o.script_pubkey, network)
        except ValueError:
            address = None
        out.append(Payee(address, o.value))
    return tuple(out)


@dataclass
class Policy:
    config: PolicyConfig
    deployment: Deployment
    plugins: dict[str, PluginFn] = field(default_factory=dict)

    def judge(self, facts: SpendFacts) -> tuple[bool, str]:
        """(accepted, reason); the reason says which rule decided."""
        c = self.config
        if not c.has_rules:
            return False, NO_RULE
        value = facts.value_out
        if c.max_value is not None and value > c.max_value:
            return False, (f"pays {value} sat out of the vaults ({facts.payees_value} to "
                           f"payees), above max_value {c.max_value}")
        if c.max_value_per_day is not None and facts.accepted_last_24h + value > c.max_value_per_day:
            return False, (f"pays {value} sat; with {facts.accepted_last_24h} sat accepted in "
                           f"the last 24 h that is above max_value_per_day {c.max_value_per_day}")
        if c.allowed_addresses is not None:
            allowed = set(c.allowed_addresses)
            for payee in facts.payees:
                if payee.address not in allowed:
                    return False, f"destination {payee.address or 'without address'} not allowed"
        for name, plugin in self.plugins.items():
            try:
                outcome = plugin(facts.vaults, facts.spend, self.deployment)
            except Exception as e:  # a plugin is third-party code: its failure refuses
                return False, f"policy plugin {name} raised {type(e).__name__}: {e}"
            accepted, reason = (outcome if isinstance(outcome, tuple) else (outcome, ""))
            if accepted is not True:
                return False, f"policy plugin {name} refused" + (f": {reason}" if reason else "")
        rules = [r for r, on in (("accept_all", c.accept_all),
                                 ("max_value", c.max_value is not None),
                                 ("max_value_per_day", c.max_value_per_day is not None),
                                 ("allowed_addresses", c.allowed_addresses is not None),
                                 ("plugins", bool(c.plugins))) if on]
        return True, "accepted by " + ", ".join(rules)
