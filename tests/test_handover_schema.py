"""The re-exec state format is pinned: a change to what one program hands the next shows up
here and must be made on purpose, following the rule in lockd.handover (new fields get
defaults; a change of meaning bumps VERSION).

To accept a deliberate change:
    LOCKD_UPDATE_HANDOVER_SCHEMA=1 python -m pytest tests/test_handover_schema.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec

from lockd import handover
from lockd.etcd.backend import _State as EtcdState
from lockd.flock.backend import _Held as FlockHeld

PINNED = Path(__file__).parent / "data" / "handover-schema.json"


def _path_schema(type_: type) -> dict[str, object]:
    if type_ is Path:
        return {"type": "string"}
    raise NotImplementedError


def current_schema() -> dict[str, object]:
    (state, flock, etcd), components = msgspec.json.schema_components(
        [handover.State, list[FlockHeld], EtcdState], schema_hook=_path_schema,
    )
    return {"version": handover.VERSION, "state": state, "flock": flock, "etcd": etcd, "components": components}


def test_handover_schema_matches_the_pinned_copy() -> None:
    schema = current_schema()
    if os.environ.get("LOCKD_UPDATE_HANDOVER_SCHEMA"):
        PINNED.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    assert schema == json.loads(PINNED.read_text()), (
        "the re-exec state format changed; if on purpose, follow lockd.handover's rule for changes and "
        "regenerate with LOCKD_UPDATE_HANDOVER_SCHEMA=1"
    )
