"""Redaction of e-mail addresses, IBANs, card numbers, long numbers and phone numbers."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.errors import ConfigError
from edge_runtime.redaction import KINDS, iban_valid, luhn_valid, redact

# (text, expected redacted text, expected count per kind; kinds not listed must be 0)
POSITIVE_CASES = [
    # e-mail
    ("write to jane@example.com today", "write to [EMAIL] today", {"email": 1}),
    ("jane.doe+promo@mail.example.co.uk", "[EMAIL]", {"email": 1}),
    ("<j_o-e.99@sub.domain.example.org>", "<[EMAIL]>", {"email": 1}),
    ("mail Jane.Doe@Example.COM.", "mail [EMAIL].", {"email": 1}),
    ("josé.müller@exemple.fr a écrit", "[EMAIL] a écrit", {"email": 1}),
    ("a@b.io and c@d.io", "[EMAIL] and [EMAIL]", {"email": 2}),
    # IBAN
    ("iban DE89 3704 0044 0532 0130 00 please", "iban [IBAN] please", {"iban": 1}),
    ("DE89370400440532013000", "[IBAN]", {"iban": 1}),
    ("send to de89 3704 0044 0532 0130 00", "send to [IBAN]", {"iban": 1}),
    ("gb82west12345698765432", "[IBAN]", {"iban": 1}),
    ("GB82 WEST 1234 5698 7654 32.", "[IBAN].", {"iban": 1}),
    ("FR14 2004 1010 0505 0001 3M02 606", "[IBAN]", {"iban": 1}),
    # A 16-character IBAN followed by a four-letter word, which the grouping also matches.
    ("BE68 5390 0754 7034 then stop", "[IBAN] then stop", {"iban": 1}),
    # card
    ("card 4111-1111-1111-1111 expired", "card [CARD] expired", {"card": 1}),
    ("card 4111 1111 1111 1111 expired", "card [CARD] expired", {"card": 1}),
    ("card 4111111111111111.", "card [CARD].", {"card": 1}),
    ("amex 3782 822463 10005", "amex [CARD]", {"card": 1}),
    ("old visa 4222222222222", "old visa [CARD]", {"card": 1}),
    ("5500-0000-0000-0004 and 4012888888881881", "[CARD] and [CARD]", {"card": 2}),
    # 13-19 digit runs that fail the Luhn check
    ("card 4111111111111112 declined", "card [NUMBER] declined", {"number": 1}),
    ("4111-1111-1111-1112", "[NUMBER]", {"number": 1}),
    # phone
    ("call me on +44 20 7946 0958 tomorrow", "call me on [PHONE] tomorrow", {"phone": 1}),
    ("call +1-415-555-2671", "call [PHONE]", {"phone": 1}),
    ("call +14155552671.", "call [PHONE].", {"phone": 1}),
    ("+49 (0)30 1234567", "[PHONE]", {"phone": 1}),
    ("my number is (415) 555-2671, thanks", "my number is [PHONE], thanks", {"phone": 1}),
    ("415.555.2671 or 415-555-2671", "[PHONE] or [PHONE]", {"phone": 2}),
    ("ring 06 12 34 56 78 tonight", "ring [PHONE] tonight", {"phone": 1}),
    ("ring 020 7946 0958.", "ring [PHONE].", {"phone": 1}),
    # several kinds in one text
    (
        "I am jane@example.com, card 4111 1111 1111 1111, phone +33 6 12 34 56 78, "
        "IBAN FR14 2004 1010 0505 0001 3M02 606",
        "I am [EMAIL], card [CARD], phone [PHONE], IBAN [IBAN]",
        {"email": 1, "card": 1, "phone": 1, "iban": 1},
    ),
]

NEGATIVE_CASES = [
    # amounts, dates, times and short numbers
    "pay $1,250.00 on 2024-05-01 at 10:30",
    "transfer 1250.00 euros",
    "transfer 125 000 000 euros",
    "€ 12 345 678 9012 is the total",
    "meet on 01.05.2024 at 9.30",
    "from 2024-05-01 10:30 to 11:45",
    "pages 1000-2000",
    "set an alarm for 7 am",
    "call 555-1234",
    # no separator and no "+": more often a reference than a phone number
    "call me at 5551234567",
    # order and ticket numbers
    "order 4417-2209-1186 has not arrived",
    "my order number is 4417-2209-1186",
    "order #100234577 is late",
    "ticket no. 020 7946 0958 is still open",
    "order 4111111111111112 is late",
    # other numbers and identifiers
    "server 192.168.100.200 is down",
    "version 1.2.3.4",
    "tracking 1Z999AA10123456784",
    "the code is A4111111111111111",
    "a 25-digit reference 1234567890123456789012345",
    # almost an e-mail address
    "jane@localhost",
    "user@domain",
    "email me at jane at example dot com",
    # IBAN-shaped, wrong check digits
    "DE88 3704 0044 0532 0130 00",
    "de00370400440532013000",
]

ADVERSARIAL_INPUTS = {
    "letters": "a" * 2000,
    "dotted letters": "a." * 1000,
    "at then dotted labels": "a@" + "a." * 999,
    "many at signs": "a@" * 1000,
    "local part then at": "a" * 1999 + "@",
    "hyphenated labels": "x@" + "a-" * 999,
    "email characters": "a.b+c-d%" * 250,
    "digits": "1" * 2000,
    "digits and spaces": "1 " * 1000,
    "digits and dashes": "1-" * 1000,
    "digits and dots": "1." * 1000,
    "plus groups": "+1 " * 666,
    "bracket groups": "(1)" * 666,
    "bracket groups with spaces": "(12) " * 400,
    "phone fragments": "+1 (2) 3-4.5 " * 153,
    "groups of four": "1234 " * 400,
    "groups of five": "12345-" * 333,
    "IBAN prefix with letter groups": "DE89" + " ABCD" * 399,
    "repeated IBAN prefixes": "DE89 " * 400,
    "reference words": "order " * 333,
}


@pytest.mark.parametrize(("text", "expected", "kinds"), POSITIVE_CASES)
def test_redact_positive_cases(text, expected, kinds):
    result = redact(text)

    assert result.text == expected
    assert result.counts == {kind: kinds.get(kind, 0) for kind in KINDS}


@pytest.mark.parametrize("text", NEGATIVE_CASES)
def test_redact_keeps_ordinary_text(text):
    result = redact(text)

    assert result.text == text
    assert result.total == 0


def test_redact_counts_every_kind():
    result = redact("nothing personal here")

    assert set(result.counts) == set(KINDS)
    assert result.total == 0


def test_long_numbers_kept_when_disabled():
    text = "card 4111111111111112 declined, 4111 1111 1111 1111 accepted"

    result = redact(text, redact_long_numbers=False)

    assert result.text == "card 4111111111111112 declined, [CARD] accepted"
    assert result.counts["card"] == 1
    assert result.counts["number"] == 0


def test_redact_rejects_non_str():
    with pytest.raises(ConfigError, match="must be a str, got bytes"):
        redact(b"jane@example.com")


@pytest.mark.parametrize(
    ("digits", "valid"),
    [
        ("4111111111111111", True),
        ("4111111111111112", False),
        ("378282246310005", True),
        ("5500000000000004", True),
        ("6011111111111117", True),
        ("6011111111111118", False),
        ("4222222222222", True),
        # Full-width digits are decimal digits too.
        ("４１１１１１１１１１１１１１１１", True),
    ],
)
def test_luhn_check(digits, valid):
    assert luhn_valid(digits) is valid


@pytest.mark.parametrize(
    ("iban", "valid"),
    [
        ("DE89 3704 0044 0532 0130 00", True),
        ("GB82WEST12345698765432", True),
        ("gb82 west 1234 5698 7654 32", True),
        ("BE68539007547034", True),
        ("NL91ABNA0417164300", True),
        ("GB82WEST12345698765433", False),  # last digit changed
        ("GB28WEST12345698765432", False),  # check digits swapped
        ("DE00370400440532013000", False),  # check digits 00 are never issued
        ("DE89 3704", False),  # too short
        ("D189370400440532013000", False),  # country code is not two letters
    ],
)
def test_iban_check(iban, valid):
    assert iban_valid(iban) is valid


@pytest.mark.parametrize("name", list(ADVERSARIAL_INPUTS))
def test_adversarial_input_completes(name):
    text = ADVERSARIAL_INPUTS[name][:2000]

    result = redact(text)

    assert isinstance(result.text, str)
    assert result.total >= 0


def test_adversarial_input_unchanged_where_nothing_matches():
    for name in ("letters", "digits", "digits and spaces", "many at signs", "groups of four"):
        text = ADVERSARIAL_INPUTS[name][:2000]
        assert redact(text).text == text, name


_FRAGMENTS = st.sampled_from(
    [*"0123456789 -.()+@aZde_:/,#$[]", "DE89", "4111", "order ", "@x.com", "GB82 "]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_FRAGMENTS, max_size=60).map("".join))
def test_redact_is_idempotent(text):
    first = redact(text)
    second = redact(first.text)

    assert second.text == first.text
    assert second.total == 0
