"""docs/protocol.md agrees with the code: its vectors, its numbers, its links.

An outside client author reads the page, not the code; a vector or a limit that
drifted there would make their implementation disagree with ours.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from revault import messages, rpc, transport
from revault.keys import bitcoin_public_key
from revault.primitives import MAX_DER_SIGNATURE

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = REPO / "docs" / "protocol.md"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def page() -> str:
    return PROTOCOL.read_text()


def vector_line(label: str) -> str:
    """The value after `label` on its line in the opinion vector block."""
    match = re.search(rf"^{re.escape(label)}\s+(.+?)\s*$", page(), re.M)
    assert match, f"no '{label}' line in docs/protocol.md"
    return match.group(1)


def test_opinion_vector_is_what_the_code_signs_and_verifies():
    signed = vector_line("signed bytes").encode()
    digest, sig = vector_line("sha256"), vector_line("sig")
    assert hashlib.sha256(signed).hexdigest() == digest
    wire = json.loads(signed)
    made = messages.sign_opinion(b"\x11" * 32, wire["vault_id"], wire["accept"],
                                 wire["reason"], wire["txid"])
    assert messages.opinion_signing_bytes(made) == signed
    assert made.pubkey == wire["pubkey"] == bitcoin_public_key(b"\x11" * 32).hex()
    assert made.sig == sig
    assert messages.verify_opinion(messages.SpendOpinionParams.parse({**wire, "sig": sig}))


def test_error_code_table_matches_rpc():
    rows = dict(re.findall(r"^\| (-32\d{3}) \| `([A-Z_]+)` \|", page(), re.M))
    assert {int(code): name for code, name in rows.items()} == {
        getattr(rpc, name): name for name in (
            "PARSE_ERROR", "INVALID_REQUEST", "METHOD_NOT_FOUND", "INVALID_PARAMS",
            "FORBIDDEN", "REFUSED", "INTERNAL_ERROR")}


@pytest.mark.parametrize("text, value", [
    ("exactly **67 bytes**", transport.ACT_ONE_LEN),
    ("exactly **48 bytes**", transport.ACT_TWO_LEN),
    ("at most **65,501 bytes**", transport.MAX_PLAINTEXT),
    ("`L > 65,517`", transport.MAX_BODY_LEN),
    ("within **10 s**", transport.HANDSHAKE_TIMEOUT),
    ("at most 1,024 characters", messages.MAX_REASON_CHARS),
    ("at most 400,000 bytes decoded", messages.MAX_TX_BYTES),
    ("at most 1,000,000 bytes decoded", messages.MAX_PSBT_BYTES),
    ("1 to 100 entries", messages.MAX_SIGNATURES),
    ("at most 144 characters", 2 * MAX_DER_SIGNATURE),
    ("A client accepts at most 1,000 entries", messages.MAX_RESULT_SIGNATURES),
    ("A client accepts at most 10,000 requests", messages.MAX_REQUESTS),
    ("a client accepts at most 1,000.", messages.MAX_OPINIONS),
    ("optional string of at most 256 characters", messages.MAX_CURSOR_CHARS),
])
def test_numbers_match_the_code(text, value):
    """Each sentence is on the page (whitespace aside) and its last number is the code's."""
    assert text in " ".join(page().split()), text
    assert int(re.findall(r"\d[\d,]*", text)[-1].replace(",", "")) == value


def test_act_one_payload_is_the_documented_one():
    assert f"payload `{transport.ACT_ONE_PAYLOAD.decode()}`" in page()
    assert f"`{transport.PROTOCOL_NAME.decode()}`" in page()


def _anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown page."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(doc):
    text = doc.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(target)
        elif anchor and anchor not in _anchors(file.read_text()):
            broken.append(target)
    assert not broken, f"{doc.name}: broken links {broken}"

