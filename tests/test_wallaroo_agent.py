"""WallarooAgent: no startup, no watching; an injected error is an Error frame and a close."""

from __future__ import annotations

import pytest

from wirefault.protocols import ConnectionAgent, ErrorPlan, get
from wirefault.protocols.wallaroo import PROTOCOL, WallarooAgent, encode, new_session


def agent() -> ConnectionAgent:
    assert PROTOCOL.new_agent is not None
    return PROTOCOL.new_agent()


def test_protocol_spec_fields() -> None:
    assert get("wallaroo") is PROTOCOL
    assert PROTOCOL.new_agent is WallarooAgent
    assert PROTOCOL.error_parameters == ("message",)
    assert PROTOCOL.derived_fields == {}
    assert PROTOCOL.cancels_backends is False


def test_started_at_once_and_never_watching() -> None:
    a = agent()
    assert a.started
    assert (a.watch_client, a.watch_server, a.track_statements) == (False, False, False)
    assert a.parameters() == {}
    assert a.cancel_request() is None


@pytest.mark.parametrize("message, expected", [
    ("sink is gone", "sink is gone"),
    (None, "wirefault: injected error"),
    ("", ""),
])
@pytest.mark.parametrize("from_client", [True, False])
def test_error_plan_is_an_error_frame(message: str | None, expected: str,
                                      from_client: bool) -> None:
    session = new_session()
    if from_client:
        (frame,) = session.client.feed(encode("Hello", version="v1", program_name="p",
                                              instance_name="i"))
    else:
        (frame,) = session.server.feed(encode("Ack", credits=5))
    a = agent()
    assert a.observe(frame) is None
    assert a.derived_field(frame, "query") is None
    plan = a.error_plan(frame, None, message, None)
    assert isinstance(plan, ErrorPlan)
    assert plan.to_server == b"" and plan.close
    # What the client reads back, framed as a client framed what its server sends.
    (error,) = new_session().server.feed(plan.to_client)
    assert error.type == "Error"
    assert error.fields == {"message": expected}
    assert error.data == plan.to_client
