"""The stored breaker hash's schema (``router.state_redis._FIELD_TYPES``) stays in step with ``BreakerState``.

No Redis is needed: these check the decoder against the dataclass it reads into. A field added to ``BreakerState``
and not to the schema would be dropped on every read from Redis (the decoder skips fields it does not know, as a
later release's), so replicas would share breakers without it.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import get_args

import pytest

from router.breaker import BreakerState, State
from router.state_redis import _FIELD_TYPES, BadBreakerHash, _decode, _encode


def test_the_schema_names_every_field_of_a_breaker_state_and_no_other() -> None:
    assert set(_FIELD_TYPES) == {f.name for f in fields(BreakerState)}


def test_every_default_and_every_state_value_round_trips() -> None:
    assert _decode(_encode(BreakerState())) == BreakerState()
    for value in get_args(State):
        state = replace(BreakerState(), state=value, consecutive=3, opened_at=12.5, buckets=((1, 2, 1),),
                        last_error="timeout", held=True, probe_at=7.0)
        assert _decode(_encode(state)) == state


def test_a_state_value_the_breaker_does_not_have_is_refused() -> None:
    raw = _encode(BreakerState())
    raw["state"] = '"ajar"'
    with pytest.raises(BadBreakerHash, match="'state'"):
        _decode(raw)
