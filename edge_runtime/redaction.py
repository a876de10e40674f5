"""Replace personal data in free text with typed placeholders before the text is stored.

``redact(text)`` finds, in this order:

- e-mail addresses -> ``[EMAIL]``
- IBANs, compact or in groups of four, that pass the ISO 13616 mod-97 check -> ``[IBAN]``
- payment-card numbers: runs of 13-19 digits, optionally separated by single spaces or dashes,
  that pass the Luhn check -> ``[CARD]``
- runs of 13-19 digits that fail the Luhn check -> ``[NUMBER]`` (``redact_long_numbers=False``
  keeps them). A mistyped card number fails the check, and at that length the digits are
  rarely needed to understand a query.
- phone numbers: ``+`` followed by 7-15 digits, or 9-15 digits in at least two groups separated
  by spaces, dots, dashes or brackets -> ``[PHONE]``

Each pattern is compiled once. Its quantifiers are bounded, and its groups cannot split the
same digits in two ways. A failed match therefore costs a bounded number of steps per start
position, so each pass takes time linear in the length of the text. The checks that a pattern
cannot express (Luhn, mod-97, digit counts, amounts, IP addresses, reference numbers) run in
Python on each candidate match.

What the patterns miss is listed in ``docs/escalation-log.md``: among others, phone numbers
without separators or with fewer than 9 digits, numbers spelled out in words, obfuscated
addresses (``jane at example dot com``), IBANs grouped other than in fours, and names and
street addresses, which this module does not look for.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from edge_runtime.errors import ConfigError

KIND_EMAIL = "email"
KIND_IBAN = "iban"
KIND_CARD = "card"
KIND_NUMBER = "number"
KIND_PHONE = "phone"
# In the order in which ``redact`` applies them.
KINDS = (KIND_EMAIL, KIND_IBAN, KIND_CARD, KIND_NUMBER, KIND_PHONE)
PLACEHOLDERS = {kind: f"[{kind.upper()}]" for kind in KINDS}

# Local part up to 64 characters (the RFC 5321 limit), then up to 8 domain labels of up to 63
# characters and a top-level domain of letters. ``\w`` is Unicode-aware, so internationalized
# addresses match as well.
EMAIL_PATTERN = re.compile(r"[\w.%+-]{1,64}@(?:[\w-]{1,63}\.){1,8}[^\W\d_]{2,63}\b")

# Country code, two check digits, then the BBAN: either compact, or in space-separated groups of
# four with a shorter last group. Letters may be lower case. A grouped candidate can run on into
# the next word ("... 7034 then"), so ``_replace_iban`` tries its prefixes, longest first.
IBAN_PATTERN = re.compile(
    r"(?<!\w)[A-Za-z]{2}[0-9]{2}"
    r"(?:[A-Za-z0-9]{11,30}|(?: [A-Za-z0-9]{4}){2,7}(?: [A-Za-z0-9]{1,4})?)"
    r"(?!\w)"
)
IBAN_MIN_LENGTH = 15
IBAN_MAX_LENGTH = 34

# 13-19 digits with at most one space or dash between two digits. The run must be whole: it
# may not start after a word character, a "+" or "digit + separator", and may not be followed
# by another digit, so a card is never cut out of a longer number.
LONG_NUMBER_PATTERN = re.compile(r"(?<![\w+])(?<!\d[ -])\d(?:[ -]?\d){12,18}(?![ -]?\d)(?!\w)")

# An optional "+", then up to 8 groups: digits, or digits in brackets. Groups are separated by
# at most one space, dot or dash. "(?!\d)" after each digit group stops the engine from splitting
# one run of digits into several groups when it backtracks. The lookbehind and the last lookahead
# keep the candidate from starting or ending inside a word, a decimal number, a date, a time or
# a path.
_PHONE_GROUP = r"(?:\(\d{1,6}\)|\d{1,15}(?!\d))"
PHONE_PATTERN = re.compile(
    r"(?<![\w+#/.,:-])"
    r"(?P<plus>\+)?" + _PHONE_GROUP + r"(?:[ .-]?" + _PHONE_GROUP + r"){0,7}"
    r"(?![\w+]|[.,:/-]\d)"
)
PHONE_INTERNATIONAL_DIGITS = (7, 15)  # E.164 allows at most 15 digits
PHONE_NATIONAL_DIGITS = (9, 15)
_PHONE_SEPARATORS = re.compile(r"[ .()-]+")
_DIGIT_RUN = re.compile(r"\d+")
# How far before a phone-shaped or long number ``_follows_reference_word`` looks.
_CONTEXT_CHARS = 40
_CURRENCY_BEFORE = re.compile(r"[$€£¥₹]\s?$")
# "order 4417-2209-1186", "my order number is ...", "ticket #...", "booking ref: ...".
_REFERENCE_BEFORE = re.compile(
    r"\b(?:order|invoice|ticket|tracking|booking|reservation|confirmation|reference|ref|case"
    r"|parcel|shipment)(?:\s+(?:number|no\.?|num|code|id))?\s*(?:#|:|is)?\s*$",
    re.IGNORECASE,
)


class RedactionResult(NamedTuple):
    """The redacted text, and how many values of each kind were replaced (every kind in
    ``KINDS`` is a key, with 0 when none was found)."""

    text: str
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def redact(text: str, *, redact_long_numbers: bool = True) -> RedactionResult:
    """Replace e-mail addresses, IBANs, card numbers, other 13-19 digit numbers and phone
    numbers in ``text`` with ``[EMAIL]``, ``[IBAN]``, ``[CARD]``, ``[NUMBER]`` and ``[PHONE]``.

    With ``redact_long_numbers=False``, 13-19 digit runs that fail the Luhn check stay as they
    are. Raises ``ConfigError`` when ``text`` is not a str.
    """
    if not isinstance(text, str):
        raise ConfigError(f"text to redact must be a str, got {type(text).__name__}")
    counts = dict.fromkeys(KINDS, 0)

    def replace_email(match: re.Match[str]) -> str:
        counts[KIND_EMAIL] += 1
        return PLACEHOLDERS[KIND_EMAIL]

    def replace_iban(match: re.Match[str]) -> str:
        return _replace_iban(match, counts)

    def replace_long_number(match: re.Match[str]) -> str:
        return _replace_long_number(match, counts, redact_long_numbers)

    def replace_phone(match: re.Match[str]) -> str:
        return _replace_phone(match, counts)

    text = EMAIL_PATTERN.sub(replace_email, text)
    text = IBAN_PATTERN.sub(replace_iban, text)
    text = LONG_NUMBER_PATTERN.sub(replace_long_number, text)
    text = PHONE_PATTERN.sub(replace_phone, text)
    return RedactionResult(text, counts)


def luhn_valid(digits: str) -> bool:
    """Return whether a string of decimal digits passes the Luhn check (ISO/IEC 7812-1)."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """Return whether ``iban`` (spaces allowed, any case) passes the ISO 13616 checks: two
    letters, check digits 02-98, 15-34 ASCII letters and digits, and mod-97 equal to 1.

    NOTE: the length is not checked against each country's fixed IBAN length, so about 1 in 97
    strings of the right shape passes by chance.
    """
    compact = iban.replace(" ", "").upper()
    if not IBAN_MIN_LENGTH <= len(compact) <= IBAN_MAX_LENGTH:
        return False
    if not (compact.isascii() and compact.isalnum()):
        return False
    country, check_digits = compact[:2], compact[2:4]
    if not (country.isalpha() and check_digits.isdigit()) or not 2 <= int(check_digits) <= 98:
        return False
    remainder = 0
    # Move the first four characters to the end and read letters as 10 (A) to 35 (Z).
    for char in compact[4:] + compact[:4]:
        if char.isdigit():
            remainder = (remainder * 10 + int(char)) % 97
        else:
            remainder = (remainder * 100 + ord(char) - ord("A") + 10) % 97
    return remainder == 1


def _replace_iban(match: re.Match[str], counts: dict[str, int]) -> str:
    candidate = match.group()
    if " " not in candidate:
        if iban_valid(candidate):
            counts[KIND_IBAN] += 1
            return PLACEHOLDERS[KIND_IBAN]
        return candidate
    # A grouped candidate may have taken words that follow the IBAN, so try each prefix that
    # ends at a group boundary, longest first, and keep the rest of the text as it was.
    ends = [index for index, char in enumerate(candidate) if char == " "][1:]
    for end in [len(candidate), *reversed(ends)]:
        if iban_valid(candidate[:end]):
            counts[KIND_IBAN] += 1
            return PLACEHOLDERS[KIND_IBAN] + candidate[end:]
    return candidate


def _replace_long_number(
    match: re.Match[str], counts: dict[str, int], redact_long_numbers: bool
) -> str:
    candidate = match.group()
    digits = "".join(_DIGIT_RUN.findall(candidate))
    if luhn_valid(digits):
        counts[KIND_CARD] += 1
        return PLACEHOLDERS[KIND_CARD]
    if not redact_long_numbers or _follows_reference_word(match):
        return candidate
    counts[KIND_NUMBER] += 1
    return PLACEHOLDERS[KIND_NUMBER]


def _replace_phone(match: re.Match[str], counts: dict[str, int]) -> str:
    if _looks_like_phone(match):
        counts[KIND_PHONE] += 1
        return PLACEHOLDERS[KIND_PHONE]
    return match.group()


def _looks_like_phone(match: re.Match[str]) -> bool:
    """Apply the checks that the phone pattern cannot express to one candidate."""
    candidate = match.group()
    groups = _DIGIT_RUN.findall(candidate)
    digit_count = sum(len(group) for group in groups)
    if match.group("plus"):
        low, high = PHONE_INTERNATIONAL_DIGITS
        return low <= digit_count <= high

    low, high = PHONE_NATIONAL_DIGITS
    # Without a "+", a run of digits with no separator is more often an order or account
    # reference than a phone number, so at least two groups are required.
    if len(groups) < 2 or not low <= digit_count <= high:
        return False
    separators = _PHONE_SEPARATORS.findall(candidate)
    if "(" not in candidate:
        # 192.168.100.200 is an IP address.
        if len(groups) == 4 and set(separators) == {"."} and all(len(g) <= 3 for g in groups):
            return False
        # 125 000 000 and 1.250.000.000 are amounts with thousands separators. NOTE: phone
        # numbers written the same way (the Spanish "612 345 678") are missed.
        if (
            len(set(separators)) == 1
            and separators[0] in (" ", ".")
            and len(groups[0]) <= 3
            and not groups[0].startswith("0")
            and all(len(group) == 3 for group in groups[1:])
        ):
            return False
    before = match.string[max(0, match.start() - _CONTEXT_CHARS) : match.start()]
    if _CURRENCY_BEFORE.search(before):
        return False
    return not _follows_reference_word(match)


def _follows_reference_word(match: re.Match[str]) -> bool:
    """Return whether the match comes right after a word such as "order" or "ticket no."."""
    before = match.string[max(0, match.start() - _CONTEXT_CHARS) : match.start()]
    return _REFERENCE_BEFORE.search(before) is not None
