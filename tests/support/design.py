"""Facts of docs/protocol.md that several test modules check the code against, written once."""

from __future__ import annotations

# "Roles": who may call each method, per daemon (`revault-<name>`).
DESIGN_ROLES: dict[str, dict[str, set[str]]] = {
    "sync-server": {
        "sig": {"stakeholder"},
        "get_sigs": {"stakeholder", "manager"},
        "err_sig": {"stakeholder"},
        "request_spend": {"manager"},
        "get_spend_requests": {"watchtower"},
        "spend_opinion": {"watchtower"},
        "get_spend_opinions": {"manager"},
    },
    "watchtower": {"sig": {"wallet"}},
    "cosigner": {"sign": {"manager"}},
}
