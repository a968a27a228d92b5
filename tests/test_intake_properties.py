"""Property-based tests: arbitrary bytes and JSON at the webhook endpoint never produce a 500,
and nothing the endpoint accepts makes a channel's normaliser fail after the ack."""

from __future__ import annotations

import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import keys
from gateway.testing import sign_headers
from tests.conftest import SECRET

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (st.lists(inner, max_size=4)
                   | st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=30,
)
ids = st.text(alphabet="abc0123456789./+=_", max_size=12)
whatsapp_message = st.fixed_dictionaries({
    "from": st.one_of(ids, st.integers(), st.none()),
    "id": st.one_of(ids, st.integers(), st.none()),
    "timestamp": st.one_of(st.text(max_size=12), st.integers(), st.none()),
    "type": st.one_of(st.sampled_from(["text", "image", "reaction", "interactive", "button",
                                        "location", "order", "system", "unsupported", "zzz"]),
                      json_values),
}, optional={"text": json_values, "image": json_values, "reaction": json_values,
             "interactive": json_values, "context": json_values, "location": json_values})
almost_whatsapp = st.fixed_dictionaries({
    "object": st.just("whatsapp_business_account"),
    "entry": st.lists(st.fixed_dictionaries({
        "id": json_values,
        "changes": st.one_of(json_values, st.lists(st.fixed_dictionaries({
            "field": st.one_of(st.just("messages"), json_values),
            "value": st.one_of(json_values, st.fixed_dictionaries({
                "metadata": st.one_of(json_values, st.fixed_dictionaries(
                    {"phone_number_id": st.one_of(ids, json_values)})),
                "messages": st.one_of(json_values, st.lists(whatsapp_message, max_size=3)),
                "statuses": json_values,
                "contacts": json_values,
            })),
        }), max_size=3)),
    }), max_size=3),
})
almost_instagram = st.fixed_dictionaries({
    "object": st.sampled_from(["instagram", "page"]),
    "entry": st.lists(st.fixed_dictionaries({
        "id": st.one_of(ids, json_values),
        "time": json_values,
        "messaging": st.one_of(json_values, st.lists(st.fixed_dictionaries({
            "sender": st.one_of(json_values, st.fixed_dictionaries({"id": ids})),
            "recipient": st.one_of(json_values, st.fixed_dictionaries({"id": ids})),
            "timestamp": json_values,
        }, optional={"message": json_values, "reaction": json_values, "read": json_values,
                     "postback": json_values, "referral": json_values,
                     "pass_thread_control": json_values, "take_thread_control": json_values,
                     "request_thread_control": json_values, "message_edit": json_values,
                     "optin": json_values}), max_size=3)),
    }), max_size=3),
})
channels = st.sampled_from(["whatsapp", "instagram"])
bodies = st.one_of(
    st.tuples(channels, st.binary(max_size=300)),
    st.tuples(channels, json_values.map(lambda v: json.dumps(v).encode())),
    st.tuples(st.just("whatsapp"), almost_whatsapp.map(lambda v: json.dumps(v).encode())),
    st.tuples(st.just("instagram"), almost_instagram.map(lambda v: json.dumps(v).encode())),
)
SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def test_arbitrary_bodies_are_200_or_400_and_never_break_normalisation(threaded_gateway):
    gw = threaded_gateway
    with httpx.Client(base_url=gw.url, timeout=10) as client:

        @SETTINGS
        @given(bodies)
        def post(case: tuple[str, bytes]) -> None:
            channel, body = case
            resp = client.post(f"/webhooks/{channel}", content=body,
                               headers=sign_headers(SECRET, body))
            assert resp.status_code in (200, 400), (resp.status_code, resp.text, body[:200])
            if resp.status_code == 400:
                assert resp.json()["error"]["code"] == "bad_request"

        post()
    gw.settle()
    registry = gw.app[keys.METRICS].registry
    for channel in ("whatsapp", "instagram"):
        assert not registry.get_sample_value("gateway_normalise_failures_total",
                                             {"channel": channel})
    assert gw.call(gw.app[keys.JOURNAL].dead_letters()) == []


def test_garbage_signature_headers_are_401(threaded_gateway):
    body = b'{"object":"whatsapp_business_account","entry":[]}'
    with httpx.Client(base_url=threaded_gateway.url, timeout=10) as client:

        @SETTINGS
        @given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80)
               .filter(lambda h: h == h.strip()))
        def post(header: str) -> None:
            resp = client.post("/webhooks/whatsapp", content=body,
                               headers={"X-Hub-Signature-256": header})
            assert resp.status_code == 401
            assert resp.json()["error"]["code"] == "bad_signature"

        post()
