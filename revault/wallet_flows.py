"""The wallet's flows as pure state machines: events in, actions out, no I/O.

`revault.wallet` is the thin asyncio shell: it performs each action (a call to the
sync server, a watchtower or a cosigner), feeds the outcome back as an event, and
persists what a flow learnt (verified signatures, acks) before acting on it, so that a
killed script resumes from its SQLite state. Each action carries `after`, the seconds
to wait before performing it: the bounded backoff of a poll is decided here, where it
can be tested without a clock.

- `SignatureRound`: every stakeholder's signature of one pre-signed transaction,
  through the sync server: post our own (again when it went missing), poll `get_sigs`,
  verify each signature locally, `err_sig` an invalid one and wait for its replacement.
- `SecureFlow`: the three revocations of a vault (cancel, emergency,
  unvault-emergency) rounds, then each complete set to each of our watchtowers, until
  every one acked every transaction.
- `ActivateFlow`: the unvault's round. It can only be made from a `SecuredVault`,
  which only `SecuredVault.check` makes, from the revocations' complete signatures
  and every watchtower's ack: the seed's ordering rule is in the types, not a comment.
- `SpendFlow`: a manager's spend: `request_spend` per vault, poll the opinions, check
  each opinion's signature, key and txid, wait for every watchtower's acceptance (or
  fail naming who refused and why), then every cosigner's signature of every input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import coincurve

from revault.messages import RelayedOpinion, verify_opinion
from revault.primitives import tx_uid
from revault.transactions import RevaultTransaction, SignatureError, VaultTransactions

__all__ = [
    "BACKOFF_START", "BACKOFF_MAX", "MAX_ERR_SIG_ROUNDS", "MAX_WATCHTOWER_NACKS", "backoff",
    "FlowError", "BadSignatures", "WatchtowerRefused", "SpendRefused", "CosignerMisbehaved",
    "NotSecured",
    "PostSig", "FetchSigs", "ErrSig", "SendToWatchtower", "RequestSpend", "FetchOpinions",
    "CosignerSign",
    "SignatureRound", "SecureFlow", "SecuredVault", "ActivateFlow", "SpendFlow",
]

BACKOFF_START = 0.05   # seconds before the second poll
BACKOFF_MAX = 2.0      # a poll never waits longer than this
MAX_ERR_SIG_ROUNDS = 5  # invalid signatures tolerated for one tx before giving up
MAX_WATCHTOWER_NACKS = 5  # a watchtower may lag its node a few blocks; not forever


def backoff(attempt: int) -> float:
    """Seconds to wait before poll number `attempt` (0: at once), doubling to a cap."""
    if attempt <= 0:
        return 0.0
    return min(BACKOFF_START * 2 ** (attempt - 1), BACKOFF_MAX)


# --- what can go wrong --------------------------------------------------------------

class FlowError(Exception):
    """A flow that cannot succeed as things stand; the message says why and what to do."""


class BadSignatures(FlowError):
    def __init__(self, txid: str, pubkeys: Sequence[str], rounds: int):
        super().__init__(
            f"tx {txid}: the sync server kept returning invalid signatures for "
            f"{', '.join(pubkeys)} after {rounds} err_sig rounds; that stakeholder's wallet "
            "(or the sync server) is faulty: contact them before trying again")
        self.txid = txid
        self.pubkeys = list(pubkeys)


class WatchtowerRefused(FlowError):
    def __init__(self, tower: str, txid: str, reason: str):
        super().__init__(f"watchtower {tower} refused revocation {txid}: {reason}")
        self.tower = tower
        self.txid = txid
        self.reason = reason


class SpendRefused(FlowError):
    def __init__(self, txid: str, refusals: Sequence[tuple[str, str]]):
        who = "; ".join(f"watchtower {pk} refused: {reason}" for pk, reason in refusals)
        super().__init__(f"spend {txid}: {who}")
        self.txid = txid
        self.refusals = list(refusals)


class CosignerMisbehaved(FlowError):
    def __init__(self, cosigner: str, index: int, txid: str, reason: str):
        super().__init__(
            f"{cosigner} gave no valid signature for input {index} of spend {txid} "
            f"({reason}); a cosigner signs an outpoint once: if another spend of this vault "
            "was cosigned before, only that spend can be completed")
        self.cosigner = cosigner
        self.index = index


class NotSecured(FlowError):
    """Activation asked for a vault whose revocations are not all complete and acked."""


# --- actions ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PostSig:
    uid: str
    pubkey: str
    signature: str
    after: float = 0.0


@dataclass(frozen=True, slots=True)
class FetchSigs:
    uid: str
    after: float = 0.0


@dataclass(frozen=True, slots=True)
class ErrSig:
    uid: str
    after: float = 0.0


@dataclass(frozen=True, slots=True)
class SendToWatchtower:
    tower: int                     # position in the wallet config's [[watchtowers]]
    txid: str
    signatures: Mapping[str, str]  # pubkey -> DER hex (ALL|ANYONECANPAY implied)
    vault_txid: str
    after: float = 0.0


@dataclass(frozen=True, slots=True)
class RequestSpend:
    vault_id: str
    transaction: str  # base64
    timestamp: int
    after: float = 0.0


@dataclass(frozen=True, slots=True)
class FetchOpinions:
    vault_id: str
    after: float = 0.0


@dataclass(frozen=True, slots=True)
class CosignerSign:
    cosigner: int  # position in the deployment's cosigners (and the config's [[cosigners]])
    psbt: str
    index: int
    txid: str  # of the spend the PSBT carries
    after: float = 0.0


# --- signature rounds -----------------------------------------------------------------

class SignatureRound:
    """Every signer's signature of input 0 of a pre-signed transaction, via the server.

    `rtx.signatures[0]` holds what is already verified (restored from the store); each
    `on_sigs` adds what it verified to it and to `fresh` (for the shell to persist).
    """

    def __init__(self, rtx: RevaultTransaction, own: tuple[bytes, bytes] | None = None):
        self.rtx = rtx
        self.uid = tx_uid(rtx.txid)
        self.own = own  # (pubkey, DER signature) we post, or None (we only collect)
        self.polls = 0
        self.err_sig_rounds = 0
        self.fresh: dict[bytes, bytes] = {}
        if own is not None:
            rtx.add_signature(0, own[0], own[1])
            self.fresh[own[0]] = own[1]

    @property
    def complete(self) -> bool:
        return self.rtx.is_complete()

    def _post_own(self, after: float = 0.0) -> list:
        if self.own is None:
            return []
        return [PostSig(self.uid, self.own[0].hex(), self.own[1].hex(), after)]

    def start(self) -> list:
        if self.complete and self.own is None:
            return []
        # Even when complete locally we post ours once: the others may still need it.
        return self._post_own() + ([] if self.complete else [FetchSigs(self.uid)])

    def on_sigs(self, signatures: Mapping[str, str]) -> list:
        """The server's map for this tx: verify and keep the good ones; what next."""
        signers = {k.hex(): k for k in self.rtx.signers(0)}
        known = self.rtx.signatures[0]
        invalid = []
        for pubkey_hex, sig_hex in signatures.items():
            pubkey = signers.get(pubkey_hex)
            if pubkey is None:
                continue  # not a signer of this tx: nothing to verify, nothing to use
            sig = bytes.fromhex(sig_hex)
            if known.get(pubkey) == sig:
                continue
            try:
                self.rtx.add_signature(0, pubkey, sig)
            except SignatureError:
                invalid.append(pubkey_hex)
                continue
            self.fresh[pubkey] = sig
        actions: list = []
        if invalid:
            self.err_sig_rounds += 1
            if self.err_sig_rounds > MAX_ERR_SIG_ROUNDS:
                raise BadSignatures(self.rtx.txid, invalid, MAX_ERR_SIG_ROUNDS)
            # err_sig erases every signature of this tx on the server: ours goes again
            # at once; the others' wallets repost theirs when they see them missing.
            actions += [ErrSig(self.uid)] + self._post_own()
        elif self.own is not None and self.own[0].hex() not in signatures:
            actions += self._post_own()
        if self.complete:
            return actions
        self.polls += 1
        return actions + [FetchSigs(self.uid, backoff(self.polls))]

    def take_fresh(self) -> dict[bytes, bytes]:
        fresh, self.fresh = self.fresh, {}
        return fresh


# --- secure ---------------------------------------------------------------------------

class SecureFlow:
    """A stakeholder securing one vault: the revocations' rounds, then every watchtower's
    ack of every complete revocation. `acked` holds (txid, tower) pairs already acked
    (from the store); `on_ack` events add to it and to `fresh_acks`."""

    def __init__(self, txs: VaultTransactions, vault_txid: str, own_secret: bytes | None,
                 towers: Sequence[str], acked: set[tuple[str, int]]):
        self.txs = txs
        self.vault_txid = vault_txid
        self.towers = list(towers)
        self.acked = set(acked)
        self.fresh_acks: list[tuple[str, int]] = []
        self.nacks: dict[tuple[str, int], int] = {}
        self.rounds: dict[str, SignatureRound] = {}
        for rtx in txs.revocations():
            own = None
            if own_secret is not None:
                # Re-signing is deterministic (RFC 6979): the same signature every run.
                own = (_pubkey_of(own_secret, rtx), rtx.sign(0, own_secret))
            self.rounds[tx_uid(rtx.txid)] = SignatureRound(rtx, own)

    @property
    def done(self) -> bool:
        return all(r.complete for r in self.rounds.values()) and all(
            (r.rtx.txid, t) in self.acked for r in self.rounds.values()
            for t in range(len(self.towers)))

    def start(self) -> list:
        if self.done:
            return []  # complete and acked by every tower: nothing to ask anyone
        actions = []
        for r in self.rounds.values():
            actions += r.start()
            if r.complete:
                actions += self._handoffs(r.rtx)
        return actions

    def _handoffs(self, rtx: RevaultTransaction, after: float = 0.0) -> list:
        sigs = {k.hex(): v.hex() for k, v in rtx.signatures[0].items()}
        return [SendToWatchtower(t, rtx.txid, sigs, self.vault_txid, after)
                for t in range(len(self.towers)) if (rtx.txid, t) not in self.acked]

    def on_sigs(self, uid: str, signatures: Mapping[str, str]) -> list:
        r = self.rounds[uid]
        actions = r.on_sigs(signatures)
        if r.complete:
            actions += self._handoffs(r.rtx)
        return actions

    def on_ack(self, tower: int, txid: str, ack: bool, reason: str) -> list:
        key = (txid, tower)
        if ack:
            if key not in self.acked:
                self.acked.add(key)
                self.fresh_acks.append(key)
            return []
        self.nacks[key] = self.nacks.get(key, 0) + 1
        if self.nacks[key] > MAX_WATCHTOWER_NACKS:
            raise WatchtowerRefused(self.towers[tower], txid, reason)
        rtx = next(r.rtx for r in self.rounds.values() if r.rtx.txid == txid)
        return [a for a in self._handoffs(rtx, backoff(self.nacks[key] + 3)) if a.tower == tower]


def _pubkey_of(secret: bytes, rtx: RevaultTransaction) -> bytes:
    pubkey = coincurve.PrivateKey(secret).public_key.format(compressed=True)
    if pubkey not in rtx.signers(0):
        raise FlowError(f"{rtx.kind.value} {rtx.txid}: this wallet's key {pubkey.hex()} "
                        "is not one of its signers")
    return pubkey


# --- activate -------------------------------------------------------------------------

@dataclass(frozen=True)
class SecuredVault:
    """Proof that a vault's revocations are complete and acked by every watchtower of
    this wallet. Only `check` builds one; an unvault signature needs one."""

    txs: VaultTransactions
    _token: object = field(repr=False, compare=False)

    @classmethod
    def check(cls, txs: VaultTransactions, towers: Sequence[str],
              acked: set[tuple[str, int]]) -> SecuredVault:
        """NotSecured, naming what is missing, unless every revocation is complete (each
        signature verified) and acked by every watchtower."""
        if not towers:
            raise NotSecured("this wallet has no watchtower: a vault is never secured "
                             "without one")
        missing = []
        for rtx in txs.revocations():
            if not rtx.is_complete():
                missing.append(f"{rtx.kind.value} {rtx.txid} lacks signatures of "
                               + ", ".join(k.hex() for k in rtx.missing_signatures(0)))
                continue
            for t, tower in enumerate(towers):
                if (rtx.txid, t) not in acked:
                    missing.append(f"{rtx.kind.value} {rtx.txid} not acked by watchtower {tower}")
        if missing:
            raise NotSecured("vault not secured, run secure() first: " + "; ".join(missing))
        return cls(txs, _SECURED)


_SECURED = object()


class ActivateFlow(SignatureRound):
    """The unvault's signature round: ours is made here, from a SecuredVault only."""

    def __init__(self, secured: SecuredVault, own_secret: bytes | None):
        if not isinstance(secured, SecuredVault) or secured._token is not _SECURED:
            raise NotSecured("an unvault signature needs SecuredVault.check")
        rtx = secured.txs.unvault
        own = None
        if own_secret is not None:
            own = (_pubkey_of(own_secret, rtx), rtx.sign(0, own_secret))
        super().__init__(rtx, own)


# --- spend ----------------------------------------------------------------------------

class SpendFlow:
    """A manager's spend of one or more vaults, up to every signature but the chain's.

    `spend` carries the managers' signatures already; `vault_ids` are the uids of the
    vaults' deposit txids, one per input in input order (a vault appears once).
    """

    def __init__(self, spend: RevaultTransaction, vault_ids: Sequence[str], timestamp: int,
                 watchtowers: Sequence[bytes], cosigners: Sequence[Sequence[bytes]]):
        self.spend = spend
        self.txid = spend.txid
        self.vault_ids = list(vault_ids)
        self.timestamp = timestamp
        self.watchtowers = {k.hex() for k in watchtowers}
        # cosigners[c][i]: cosigner c's pubkey for input i (xpubs derive per vault)
        self.cosigners = [list(keys) for keys in cosigners]
        # Opinion keys that signed their acceptance of this txid. An opinion names one
        # vault of the spend but commits to the whole transaction (its txid): one per
        # watchtower is enough, whichever vault's request it answered.
        self.accepted: set[str] = set()
        self.polls: dict[str, int] = {v: 0 for v in self.vault_ids}
        self.ignored: list[str] = []  # opinions not counted, and why (for logs)
        self.cosigning = False
        self.psbt = spend.to_psbt()

    @property
    def approved(self) -> bool:
        return self.accepted >= self.watchtowers

    @property
    def done(self) -> bool:
        return self.approved and self.spend.is_complete()

    def start(self, requested: bool = False) -> list:
        actions: list = []
        if not requested:
            tx = self.spend.tx.to_base64()
            actions += [RequestSpend(v, tx, self.timestamp) for v in self.vault_ids]
        if not self.watchtowers:
            raise FlowError("the deployment lists no watchtowers: no spend can be approved")
        return actions + [FetchOpinions(v) for v in self.vault_ids]

    def on_opinions(self, vault_id: str, opinions: Sequence[RelayedOpinion]) -> list:
        refusals = []
        for op in opinions:
            why = self._not_counted(vault_id, op)
            if why:
                self.ignored.append(why)
                continue
            if op.accepted:
                self.accepted.add(op.pubkey)
            else:
                refusals.append((op.pubkey, op.reason))
        if refusals:
            raise SpendRefused(self.txid, refusals)
        if self.approved:
            if self.cosigning:
                return []  # another vault's poll got there first
            self.cosigning = True
            return self._cosign()
        self.polls[vault_id] += 1
        return [FetchOpinions(vault_id, backoff(self.polls[vault_id]))]

    def _not_counted(self, vault_id: str, op: RelayedOpinion) -> str:
        if op.txid != self.txid:
            return f"opinion of {op.pubkey} is about another spend ({op.txid})"
        if op.pubkey not in self.watchtowers:
            return f"opinion by {op.pubkey}, not a deployment watchtower"
        if not verify_opinion(op.to_params(vault_id)):
            return f"opinion of {op.pubkey} has an invalid signature"
        return ""

    def _cosign(self) -> list:
        return [CosignerSign(c, self.psbt, i, self.txid)
                for c, keys in enumerate(self.cosigners)
                for i in range(len(self.spend.tx.inputs))
                if keys[i] not in self.spend.signatures[i]]

    def on_cosignature(self, cosigner: int, name: str, index: int, signature: bytes) -> list:
        try:
            self.spend.add_signature(index, self.cosigners[cosigner][index], signature)
        except SignatureError as e:
            raise CosignerMisbehaved(name, index, self.txid, str(e)) from None
        return []
