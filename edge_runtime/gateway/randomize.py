"""Keyed output randomization: near-tie answers chosen by an HMAC of the normalized query.

When the teacher's two most probable labels are within ``margin`` of each other, the gateway
answers with one of the two, chosen by HMAC-SHA256 under a server secret. The choice depends
only on the secret, the normalized query and the two labels, so:

- a repeated query gets the same answer every time, and an extraction attacker cannot average
  the perturbation away by asking again;
- a paraphrase gets an independent choice, because its normalized text differs;
- the choice does not depend on which of the two labels the teacher ranked first, so a
  probability difference in the last bits (another replica, another batch size) cannot flip it.

An honest client loses little, because on a near-tie the teacher's top-1 is right about as
often as its runner-up. ``benchmarks/randomization_accuracy.py`` measures this on CLINC150 with
models/clinc150-teacher.edgepkg. The default margin of 0.15 was chosen on the validation split,
where it changes accuracy by an expected -0.18 points (over keys). On the test split it changes
accuracy by an expected +0.05 points and alters 3.3% of the answers.

The secret is at least 32 bytes. ``secret_from_env`` reads it as hex from an environment
variable, so that it stays out of config files.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import unicodedata
from collections.abc import Sequence

from edge_runtime.errors import ConfigError

MIN_SECRET_BYTES = 32
DEFAULT_MARGIN = 0.15  # maximum top-1 minus top-2 probability that counts as a near-tie
DEFAULT_DEGRADED_MARGIN = 0.5  # the same for clients in the "degrade" tier
DEGRADE_TIER = "degrade"
GENERATE_HINT = "generate one with: python -c 'import secrets; print(secrets.token_hex(32))'"

# Domain separation: each keyed decision hashes its own prefix, so that the randomizer and the
# watermark stay independent even when they are given the same secret.
_CHOICE_DOMAIN = b"edge-runtime randomize choice v1\x00"


def normalize_query(text: str) -> str:
    """Return the form of a query that keyed decisions hash.

    The steps are Unicode NFKC normalization, case folding (then NFKC again, because folding
    can produce text outside NFKC), removal of invisible format and control characters, and
    collapsing every run of whitespace to one space. Finally, punctuation and spaces at
    either end are stripped. Variants that differ only in case, spacing, full-width forms,
    zero-width characters or a trailing "?" normalize to the same text. Paraphrases and
    changed words still differ, because the words themselves are kept.
    """
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    visible = "".join(
        char for char in folded
        if char.isspace() or unicodedata.category(char) not in ("Cf", "Cc")
    )
    collapsed = " ".join(visible.split())

    start = 0
    end = len(collapsed)
    while start < end and _is_edge_junk(collapsed[start]):
        start += 1
    while end > start and _is_edge_junk(collapsed[end - 1]):
        end -= 1
    return collapsed[start:end]


def _is_edge_junk(char: str) -> bool:
    return char.isspace() or unicodedata.category(char).startswith("P")


def check_secret(secret: bytes, name: str = "secret") -> bytes:
    """Return ``secret`` if it is bytes of at least MIN_SECRET_BYTES, else raise ConfigError."""
    if not isinstance(secret, (bytes, bytearray)):
        raise ConfigError(
            f"{name} must be bytes, got {type(secret).__name__}; decode a hex string with "
            f"bytes.fromhex() or read it with secret_from_env()"
        )
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{name} is {len(secret)} bytes; use at least {MIN_SECRET_BYTES} random bytes, and "
            f"{GENERATE_HINT}"
        )
    return bytes(secret)


def secret_from_env(variable: str) -> bytes:
    """Read a secret written as hex digits from the environment variable ``variable``.

    Raises ConfigError, naming the variable but never its value, when it is unset, not hex or
    shorter than MIN_SECRET_BYTES bytes.
    """
    value = os.environ.get(variable)
    if value is None or not value.strip():
        raise ConfigError(
            f"environment variable {variable} is not set; set it to {2 * MIN_SECRET_BYTES} or "
            f"more hex digits, and {GENERATE_HINT}"
        )
    try:
        secret = bytes.fromhex(value.strip())
    except ValueError:
        raise ConfigError(
            f"environment variable {variable} is not valid hex; set it to "
            f"{2 * MIN_SECRET_BYTES} or more hex digits, and {GENERATE_HINT}"
        ) from None
    return check_secret(secret, name=f"environment variable {variable}")


def check_candidates(candidates: Sequence[tuple[str, float]]) -> None:
    """Raise ValueError unless ``candidates`` are (label, probability) pairs, best first.

    The list must not be empty, labels must be distinct strings, and probabilities must be
    finite numbers in [0, 1] that do not increase.
    """
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence):
        raise ValueError("candidates must be a sequence of (label, probability) pairs")
    if not candidates:
        raise ValueError("candidates is empty; pass at least the teacher's top-1 label")
    seen: set[str] = set()
    previous = math.inf
    for index, pair in enumerate(candidates):
        if not isinstance(pair, Sequence) or isinstance(pair, (str, bytes)) or len(pair) != 2:
            raise ValueError(f"candidates[{index}] is not a (label, probability) pair")
        label, probability = pair
        if not isinstance(label, str) or not label:
            raise ValueError(f"candidates[{index}] has a label that is not a non-empty string")
        if label in seen:
            raise ValueError(f"candidates[{index}] repeats the label {label!r}")
        seen.add(label)
        if (isinstance(probability, bool) or not isinstance(probability, (int, float))
                or not math.isfinite(probability) or not 0.0 <= probability <= 1.0):
            raise ValueError(f"candidates[{index}] has a probability outside [0, 1]")
        if probability > previous:
            raise ValueError(
                f"candidates[{index}] is more probable than the candidate before it; pass "
                "candidates best first, as TeacherReply.candidates holds them"
            )
        previous = probability


class KeyedRandomizer:
    """Near-tie answers chosen by HMAC-SHA256(secret, normalized query, label).

    ``margin`` applies to every tier except "degrade", which gets the wider
    ``degraded_margin``. Both are differences of probabilities, in [0, 1].
    """

    def __init__(self, secret: bytes, margin: float = DEFAULT_MARGIN,
                 degraded_margin: float = DEFAULT_DEGRADED_MARGIN):
        self._secret = check_secret(secret, name="randomizer secret")
        for name, value in (("margin", margin), ("degraded_margin", degraded_margin)):
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or not 0.0 <= value <= 1.0):
                raise ConfigError(f"{name} must be a probability difference in [0, 1], "
                                  f"got {value!r}")
        if degraded_margin < margin:
            raise ConfigError(
                f"degraded_margin ({degraded_margin}) is below margin ({margin}); the "
                "degrade tier must perturb at least as many answers as the default tier"
            )
        self.margin = float(margin)
        self.degraded_margin = float(degraded_margin)

    def __repr__(self) -> str:  # the secret stays out of reprs and logs
        return (f"KeyedRandomizer(margin={self.margin}, "
                f"degraded_margin={self.degraded_margin})")

    def margin_for(self, tier: str) -> float:
        """Return the near-tie margin of ``tier``: degraded_margin for "degrade", else margin."""
        return self.degraded_margin if tier == DEGRADE_TIER else self.margin

    def choose(self, text: str, candidates: Sequence[tuple[str, float]], tier: str) -> str:
        """Return the label to answer ``text`` with; the result is one of the top two labels.

        ``candidates`` are the teacher's (label, probability) pairs, best first. When the top
        two probabilities are within the tier's margin, the keyed choice picks one of the
        two. Otherwise, or with a single candidate, the result is the top-1 label.
        """
        check_candidates(candidates)
        top_label, top_probability = candidates[0]
        if len(candidates) < 2:
            return top_label
        runner_up, runner_up_probability = candidates[1]
        if top_probability - runner_up_probability > self.margin_for(tier):
            return top_label

        normalized = normalize_query(text).encode("utf-8")
        scores = {label: self._score(normalized, label) for label in (top_label, runner_up)}
        return max(scores, key=scores.__getitem__)

    def _score(self, normalized: bytes, label: str) -> bytes:
        message = _CHOICE_DOMAIN + normalized + b"\x00" + label.encode("utf-8")
        return hmac.new(self._secret, message, hashlib.sha256).digest()
