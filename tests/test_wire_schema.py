"""The wire is pinned: any change to a message shows up here and must be made on purpose.

To accept a deliberate change (and describe it in docs/protocol.md):
    LOCKD_UPDATE_WIRE_SCHEMA=1 python -m pytest tests/test_wire_schema.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
from lockd_client import protocol

PINNED = Path(__file__).parent / "data" / "wire-schema.json"


def current_schema() -> dict[str, object]:
    (request, reply), components = msgspec.json.schema_components([protocol.Request, protocol.Reply])
    return {
        "version": protocol.PROTOCOL_VERSION,
        "max_request_frame": protocol.MAX_REQUEST_FRAME,
        "request": request,
        "reply": reply,
        "components": components,
    }


def test_wire_schema_matches_the_pinned_copy() -> None:
    schema = current_schema()
    if os.environ.get("LOCKD_UPDATE_WIRE_SCHEMA"):
        PINNED.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    assert schema == json.loads(PINNED.read_text()), (
        "the wire protocol changed; if on purpose, bump docs/protocol.md and regenerate "
        "with LOCKD_UPDATE_WIRE_SCHEMA=1"
    )


def test_every_documented_message_tag_is_in_the_docs() -> None:
    docs = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    for union in (protocol.Request, protocol.Reply):
        for cls in union.__args__:
            tag = msgspec.inspect.type_info(cls).tag
            assert f"`{tag}`" in docs, f"message {tag!r} is not described in docs/protocol.md"
