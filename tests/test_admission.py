"""Connection slots (revault.admission): pure bookkeeping, checked step by step."""

import pytest

from revault.admission import ANONYMOUS, AUTHENTICATED, KEYED, ConnectionSlots

A, B, C = b"A" * 32, b"B" * 32, b"C" * 32


def slots(**overrides) -> ConnectionSlots:
    limits = dict(max_connections=20, max_handshakes=4, max_handshakes_per_address=2,
                  max_connections_per_peer=3, peers=[A, B, C])
    limits.update(overrides)
    return ConnectionSlots(**limits)


def authenticated(s: ConnectionSlots, conn: str, peer: bytes, address: str = "x") -> None:
    assert s.accept(conn, address).admitted
    assert s.identify(conn, peer).admitted
    s.authenticate(conn)
    assert s.state_of(conn) == AUTHENTICATED


def test_a_flooding_address_only_evicts_its_own_oldest():
    s = slots()
    assert s.accept("good", "1.1.1.1").evicted == []
    assert s.accept("f1", "6.6.6.6").evicted == []
    assert s.accept("f2", "6.6.6.6").evicted == []
    admission = s.accept("f3", "6.6.6.6")
    assert admission.admitted and admission.evicted == ["f1"]
    assert "max_handshakes_per_address" in admission.reason
    assert s.state_of("good") == ANONYMOUS and s.state_of("f1") is None
    assert s.anonymous == 3


def test_full_handshake_budget_evicts_from_the_address_holding_most():
    s = slots(max_handshakes=4, max_handshakes_per_address=3)
    for conn, address in [("x1", "x"), ("x2", "x"), ("x3", "x"), ("y1", "y")]:
        assert s.accept(conn, address).evicted == []
    admission = s.accept("z1", "z")
    assert admission.evicted == ["x1"] and "max_handshakes" in admission.reason
    assert {s.state_of(c) for c in ("y1", "z1", "x2")} == {ANONYMOUS}


def test_max_connections_refuses_one_more_at_once():
    s = slots(max_connections=5, max_handshakes=2)
    for i, peer in enumerate([A, B, C]):
        authenticated(s, f"p{i}", peer, address=f"a{i}")
    assert s.accept("h1", "q").admitted and s.accept("h2", "r").admitted
    admission = s.accept("h3", "s")
    assert not admission.admitted and "max_connections" in admission.reason
    assert s.total == 5


def test_replayed_act_ones_never_lock_their_peer_out():
    s = slots(max_connections_per_peer=2, max_handshakes_per_address=4)
    for replay in ("r1", "r2", "r3"):
        assert s.accept(replay, "eve").admitted
    assert s.identify("r1", A).admitted and s.identify("r2", A).admitted
    admission = s.identify("r3", A)        # keyed slots full: the oldest replay goes
    assert admission.admitted and admission.evicted == ["r1"]
    assert s.accept("real", "alice").admitted
    admission = s.identify("real", A)
    assert admission.admitted and admission.evicted == ["r2"]
    s.authenticate("real")
    assert s.state_of("real") == AUTHENTICATED and s.state_of("r3") == KEYED
    assert s.held_by(A) == 2


def test_a_peer_at_its_cap_of_authenticated_connections_is_refused():
    s = slots(max_connections_per_peer=2)
    authenticated(s, "a1", A)
    authenticated(s, "a2", A, address="y")
    assert s.accept("a3", "z").admitted
    admission = s.identify("a3", A)
    assert not admission.admitted and "max_connections_per_peer" in admission.reason
    assert s.state_of("a3") is None and s.held_by(A) == 2
    s.release("a1")
    authenticated(s, "a4", A)


def test_every_configured_peer_keeps_a_slot():
    # 6 sockets, 2 for handshakes: 4 peer slots for 3 peers. A may take 2, never the
    # slots kept for B and C.
    s = slots(max_connections=6, max_handshakes=2, max_connections_per_peer=5)
    authenticated(s, "a1", A)
    authenticated(s, "a2", A)
    assert s.accept("a3", "x").admitted
    assert not s.identify("a3", A).admitted
    authenticated(s, "b1", B)
    authenticated(s, "c1", C)
    assert s.total == 4
    s.release("b1")
    assert s.accept("a5", "x").admitted
    assert not s.identify("a5", A).admitted   # the slot B freed is kept for B
    authenticated(s, "b2", B)
    s.release("a1")
    authenticated(s, "a6", A)
    assert s.held_by(A) == 2


def test_release_forgets_every_state_and_unknown_connections():
    s = slots()
    assert s.accept("anon", "x").admitted
    assert s.accept("keyed", "x").admitted and s.identify("keyed", B).admitted
    authenticated(s, "auth", C, address="y")
    for conn in ("anon", "keyed", "auth", "never seen"):
        s.release(conn)
    assert s.total == 0 and s.anonymous == 0
    assert s.held_by(B) == 0 and s.held_by(C) == 0
    assert not s.identify("stranger", A).admitted


def test_limits_are_checked():
    with pytest.raises(ValueError):
        slots(max_handshakes=21)
    with pytest.raises(ValueError):
        slots(max_handshakes_per_address=5)
    with pytest.raises(ValueError):
        slots(max_connections_per_peer=0)
