"""Who may hold a connection slot: pure bookkeeping for a Noise server (no sockets, no clock).

A server has `max_connections` sockets to give. Without rules, anyone able to open TCP
connections could hold them all, and so could any one configured peer. The rules:

* A connection starts *anonymous* (accepted, act one not yet read). Anonymous
  connections share a budget of `max_handshakes`, at most `max_handshakes_per_address`
  from one source address. A newcomer over the latter evicts the oldest anonymous
  connection of its own address; when the shared budget is full, it evicts the oldest
  of the address holding the most: a flood of silent sockets only churns the flooder's
  own, while a well-behaved client, whose act one follows its connect at once, is gone
  from the anonymous set before it could be the oldest of the fullest address.
* Once act one decrypts with a configured key it is *keyed*: it counts against that
  peer (at most `max_connections_per_peer`), but it proves nothing yet, since an
  eavesdropper can replay a captured act one. A new act one for a peer whose slots are
  full evicts that peer's oldest keyed connection, so replays never lock the peer out.
* Once its first frame decrypts it is *authenticated*: only the key's holder can get
  there. A peer at its cap of authenticated connections is refused a new one.
* Peers share `max_connections - max_handshakes` slots, and a slot is kept free for
  every configured peer that holds none: each can always get its first connection.
* When `max_connections` sockets are open, one more is closed at once (docs/protocol.md).

The server calls `accept`, `identify`, `authenticate` and `release` as a connection
moves on, and closes whatever they answer to evict. Connections are any hashable objects.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Hashable, Iterable

ANONYMOUS, KEYED, AUTHENTICATED = "anonymous", "keyed", "authenticated"


@dataclass
class Admission:
    """The answer to one step: whether the connection may go on, and who must go."""
    admitted: bool
    evicted: list = field(default_factory=list)
    reason: str = ""          # why it was refused or why the evicted were evicted


@dataclass
class _Entry:
    state: str
    owner: Hashable           # the source address while anonymous, then the peer key


class ConnectionSlots:
    def __init__(self, *, max_connections: int, max_handshakes: int,
                 max_handshakes_per_address: int, max_connections_per_peer: int,
                 peers: Iterable[bytes]):
        if not 1 <= max_handshakes <= max_connections:
            raise ValueError("max_handshakes must be between 1 and max_connections")
        if not 1 <= max_handshakes_per_address <= max_handshakes:
            raise ValueError("max_handshakes_per_address must be between 1 and "
                             "max_handshakes")
        if max_connections_per_peer < 1:
            raise ValueError("max_connections_per_peer must be at least 1")
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes
        self.per_address = max_handshakes_per_address
        self.per_peer = max_connections_per_peer
        self.peer_budget = max_connections - max_handshakes
        self._entries: dict[Hashable, _Entry] = {}
        # Anonymous connections by source address, oldest first.
        self._anonymous: dict[Hashable, collections.OrderedDict] = {}
        self._anonymous_count = 0
        # Keyed (oldest first) and authenticated connections by peer key.
        self._keyed: dict[bytes, collections.OrderedDict] = {}
        self._authenticated: dict[bytes, int] = {}
        self._occupied: dict[bytes, int] = {bytes(p): 0 for p in peers}
        self._peer_total = 0
        self._unoccupied = len(self._occupied)

    # -- queries --
    @property
    def total(self) -> int:
        return len(self._entries)

    @property
    def anonymous(self) -> int:
        return self._anonymous_count

    def held_by(self, peer: bytes) -> int:
        """Keyed and authenticated connections of one peer."""
        return self._occupied.get(peer, 0)

    def state_of(self, conn: Hashable) -> str | None:
        entry = self._entries.get(conn)
        return entry.state if entry is not None else None

    # -- steps --
    def accept(self, conn: Hashable, address: Hashable) -> Admission:
        if self.total >= self.max_connections:
            return Admission(False, reason=f"max_connections ({self.max_connections}) reached")
        evicted: list = []
        reason = ""
        own = self._anonymous.get(address)
        if own is not None and len(own) >= self.per_address:
            evicted.append(self._evict_anonymous(address))
            reason = (f"max_handshakes_per_address ({self.per_address}) reached")
        elif self._anonymous_count >= self.max_handshakes:
            fullest = max(self._anonymous, key=lambda a: len(self._anonymous[a]))
            evicted.append(self._evict_anonymous(fullest))
            reason = f"max_handshakes ({self.max_handshakes}) reached"
        self._entries[conn] = _Entry(ANONYMOUS, address)
        self._anonymous.setdefault(address, collections.OrderedDict())[conn] = None
        self._anonymous_count += 1
        return Admission(True, evicted, reason)

    def identify(self, conn: Hashable, peer: bytes) -> Admission:
        """Act one decrypted with `peer`'s key: may the handshake go on?"""
        entry = self._entries.get(conn)
        if entry is None or entry.state != ANONYMOUS or peer not in self._occupied:
            return Admission(False, reason="not an anonymous connection of a known peer")
        self._drop_anonymous(conn, entry.owner)
        if self._authenticated.get(peer, 0) >= self.per_peer:
            del self._entries[conn]
            return Admission(False, reason=f"max_connections_per_peer ({self.per_peer}) "
                                           "reached")
        evicted: list = []
        keyed = self._keyed.setdefault(peer, collections.OrderedDict())
        if self._occupied[peer] >= self.per_peer or not self._room_for(peer):
            if not keyed:
                del self._entries[conn]
                return Admission(False, reason="no connection slot left for a peer that "
                                               "already holds one")
            old, _ = keyed.popitem(last=False)
            del self._entries[old]
            self._occupy(peer, -1)
            evicted.append(old)
        keyed[conn] = None
        entry.state, entry.owner = KEYED, peer
        self._occupy(peer, +1)
        return Admission(True, evicted, "a newer handshake for the same peer" if evicted else "")

    def authenticate(self, conn: Hashable) -> None:
        """Its first frame decrypted: only the key's holder could have sent it."""
        entry = self._entries.get(conn)
        if entry is None or entry.state != KEYED:
            return
        del self._keyed[entry.owner][conn]
        entry.state = AUTHENTICATED
        self._authenticated[entry.owner] = self._authenticated.get(entry.owner, 0) + 1

    def release(self, conn: Hashable) -> None:
        """The connection is gone (closed, lost, evicted or refused)."""
        entry = self._entries.pop(conn, None)
        if entry is None:
            return
        if entry.state == ANONYMOUS:
            self._drop_anonymous(conn, entry.owner)
            return
        if entry.state == KEYED:
            del self._keyed[entry.owner][conn]
        else:
            self._authenticated[entry.owner] -= 1
        self._occupy(entry.owner, -1)

    # -- internals --
    def _room_for(self, peer: bytes) -> bool:
        """Whether `peer` may take one more peer slot, every idle peer's slot kept free."""
        if self._occupied[peer] == 0:
            return True  # its own reserved slot
        return self._peer_total + 1 + self._unoccupied <= self.peer_budget

    def _occupy(self, peer: bytes, delta: int) -> None:
        before = self._occupied[peer]
        after = self._occupied[peer] = before + delta
        self._peer_total += delta
        if before == 0 and after > 0:
            self._unoccupied -= 1
        elif before > 0 and after == 0:
            self._unoccupied += 1

    def _evict_anonymous(self, address: Hashable) -> Hashable:
        oldest = next(iter(self._anonymous[address]))
        del self._entries[oldest]
        self._drop_anonymous(oldest, address)
        return oldest

    def _drop_anonymous(self, conn: Hashable, address: Hashable) -> None:
        group = self._anonymous[address]
        del group[conn]
        if not group:
            del self._anonymous[address]
        self._anonymous_count -= 1
