"""``X-Hub-Signature-256`` verification fails closed on every malformed or missing input."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from gateway.signatures import sign, verify

SECRET = b"app-secret"
BODY = b'{"object":"whatsapp_business_account","entry":[]}'
GOOD = "sha256=" + hmac.new(SECRET, BODY, hashlib.sha256).hexdigest()


def test_meta_signature_verifies_in_either_case():
    assert sign(SECRET, BODY) == GOOD
    assert verify(SECRET, BODY, GOOD)
    assert verify(SECRET, BODY, "sha256=" + GOOD[7:].upper())


@pytest.mark.parametrize("header", [
    None, "", "sha256=", GOOD[7:], "sha1=" + GOOD[7:], GOOD[:-1], GOOD + "0",
    "sha256=" + "z" * 64, "sha256=" + GOOD[7:39] + " " * 32, GOOD[:-2] + "00",
    GOOD + "\xa0", GOOD + "\x85", GOOD + "\u3000", GOOD + "\x0b", GOOD + "\n", "\u2028" + GOOD,
    "sha256=" + "\xe9" * 64, "sha256=" + "\udcff" * 64, GOOD[:-1] + "\u0660",  # Arabic-Indic 0
    GOOD[:-1] + "\udce9",  # an undecodable byte, as aiohttp's surrogateescape passes it on
])
def test_malformed_missing_or_wrong_headers_fail(header):
    assert not verify(SECRET, BODY, header)


def test_only_ows_around_the_digest_is_ignored():
    assert verify(SECRET, BODY, GOOD + " \t")
    assert verify(SECRET, BODY, "sha256=\t " + GOOD[7:])


@pytest.mark.parametrize("secret", [None, b""])
def test_no_secret_fails_closed(secret):
    assert not verify(secret, BODY, GOOD)


def test_any_change_of_body_or_secret_fails():
    assert not verify(SECRET, BODY + b" ", GOOD)
    assert not verify(SECRET, BODY.replace(b"[]", b"[1]"), GOOD)
    assert not verify(b"other-secret", BODY, GOOD)
