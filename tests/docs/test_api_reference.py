"""docs/api.md names every RPC of refit.v1.Refit, nothing else, with the role service/auth.py
lets call it: the reference is read against the proto and the code, not kept by hand."""

import re
from pathlib import Path

from service.auth import PREDICT_RPCS

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "refit" / "v1" / "refit.proto"
API_DOC = ROOT / "docs" / "api.md"
SECTION = re.compile(r"^## `(\w+)`$", re.MULTILINE)
ROLE = re.compile(r"^Role: `(\w+)`", re.MULTILINE)


def proto_rpcs() -> set[str]:
    return set(re.findall(r"\brpc\s+(\w+)\s*\(", PROTO.read_text()))


def doc_sections() -> dict[str, str]:
    """Each RPC section's heading name and its body."""
    text = API_DOC.read_text()
    heads = list(SECTION.finditer(text))
    ends = [h.start() for h in heads[1:]] + [len(text)]
    return {
        h.group(1): text[h.end() : end] for h, end in zip(heads, ends[: len(heads)], strict=True)
    }


def test_every_rpc_has_a_section_and_every_section_an_rpc() -> None:
    rpcs, sections = proto_rpcs(), doc_sections()
    assert rpcs, "no rpc parsed from the proto"
    headings = SECTION.findall(API_DOC.read_text())
    assert len(headings) == len(set(headings)), "an RPC has two sections"
    assert sorted(rpcs - sections.keys()) == [], "RPCs without a section in docs/api.md"
    assert sorted(sections.keys() - rpcs) == [], "sections naming no RPC of the proto"


def test_each_section_states_the_role_auth_enforces() -> None:
    for rpc, body in doc_sections().items():
        roles = ROLE.findall(body)
        expected = "predict" if rpc in PREDICT_RPCS else "admin"
        assert roles == [expected], f"{rpc}: docs say {roles}, service/auth.py means {expected}"
