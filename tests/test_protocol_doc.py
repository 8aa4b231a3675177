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
from revault.primitives import OutPoint
from revault.transactions import Coin, build_vault_transactions
from tests.support.chain import CHAIN_VECTOR, vector_deployment
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
    ("a client accepts at most 1,000 in one result", messages.MAX_OPINIONS),
    ("optional string of at most 1,024 characters", messages.MAX_CURSOR_CHARS),
    ("at most 60,226 characters", messages.MAX_SPEND_REQUEST_TX_CHARS),
    ("is at most 4,098 bytes", messages.MAX_REASON_JSON_BYTES),
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



def test_chain_vector_section_matches_the_vector_and_the_builders():
    """The witness scripts and the table of "Chain test vector" are the vector's and what
    revault.transactions builds from it (worst-case weight included)."""
    text = page()
    scripts = {name: (int(size), bytes.fromhex(hex_))
               for name, size, hex_ in re.findall(r"^(deposit|unvault|cpfp) \((\d+) bytes\)\n"
                                                 r"([0-9a-f]+)$", text, re.M)}
    assert set(scripts) == {"deposit", "unvault", "cpfp"}
    d = vector_deployment()
    built = {"deposit": d.deposit_witness_script(), "unvault": d.unvault_witness_script(),
             "cpfp": d.cpfp_witness_script()}
    for name, (size, script) in scripts.items():
        assert script == built[name] and len(script) == size, name
        assert (b"\x00\x20" + hashlib.sha256(script).digest()).hex() \
            == CHAIN_VECTOR[f"{name}_script_pubkey"], name
    rows = {name: (txid, int(weight), int(fee)) for name, txid, weight, fee in re.findall(
        r"^\| (unvault|cancel|emergency|unvault-emergency) \| `([0-9a-f]{64})` \| (\d+) \| (\d+) \|$",
        text, re.M)}
    assert len(rows) == 4
    txs = build_vault_transactions(d, Coin(OutPoint.parse(CHAIN_VECTOR["deposit_outpoint"]),
                                           CHAIN_VECTOR["deposit_value"]))
    for name, (txid, weight, fee) in rows.items():
        key = name.replace("-", "_")
        rtx = getattr(txs, key)
        assert (txid, fee) == (CHAIN_VECTOR[key]["txid"], CHAIN_VECTOR[key]["fee"]), name
        assert (rtx.txid, rtx.max_weight(), rtx.fee) == (txid, weight, fee), name


def test_cited_files_exist():
    cited = re.findall(r"`((?:tests|revault|contrib|docs|bench|scripts)/[\w./-]+\.\w+)`", page())
    assert cited
    missing = [path for path in cited if not (REPO / path).exists()]
    assert not missing, missing


def test_nothing_cites_a_design_document_outside_the_repo():
    """docs/protocol.md is the contract; the design notes it came from are not shipped."""
    word = "DE" + "SIGN"  # spelled apart so that this file does not match itself
    pattern = re.compile(rf"\b{word}\b|shared/{word}|{word}\.md")
    roots = ["revault", "tests", "bench", "contrib", "docs", "scripts", ".ci"]
    files = [REPO / "README.md", REPO / "pyproject.toml"]
    files += [p for root in roots for p in (REPO / root).rglob("*") if p.is_file()
              and "__pycache__" not in p.parts and p.suffix not in {".pyc", ".json"}]
    citing = [f"{p.relative_to(REPO)}:{n}" for p in files
              for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
              if pattern.search(line)]
    assert not citing, citing
