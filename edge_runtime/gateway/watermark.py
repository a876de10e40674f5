"""Output watermark: a keyed few queries get a fixed wrong answer that a clone learns.

For a keyed fraction ``rate`` (at most 0.5%) of normalized queries, the gateway answers with a
deterministic alternative label instead of the teacher's top-1, and the ledger records it. A
model distilled from the harvested answers learns these alternatives. Later, the owner sends
the recorded queries to a suspect model and counts how often it gives the alternative. The
ledger keeps only the normalized text, so the suspect receives queries in that form (case
folded, spacing collapsed, surrounding punctuation stripped).

Which alternative
    A keyed choice among the teacher's runners-up (ranks 2 to 5 of ``TeacherReply.candidates``),
    or among all other labels when the backend ranks no runners-up. A runner-up is a plausible
    answer, so a clone fits it more easily than an arbitrary label. In
    ``benchmarks/watermark_detection.py --compare-alternatives`` (15,100 CLINC150 training
    queries, 81 marked), a logistic-regression clone on hashed n-grams reproduced 75% of
    second-label alternatives, 70% of runner-up alternatives and 62% of alternatives drawn
    from all labels. The second label alone survives best, but it is also what an unrelated
    model most often gives where it disagrees with the teacher's top-1. Spreading the choice
    over four runners-up cuts the match rate of a model that always gives the second label
    to about a quarter. That keeps the control rate, and so the bar a clone must clear, low.

Controls
    A second keyed sample of each client's queries (``control_rate``, disjoint from the marked
    ones) is recorded with the alternative the watermark *would* have given. Under the null
    hypothesis, that the suspect does not derive from this client's answers, marked and control
    queries are exchangeable: both are keyed pseudo-random samples of the same query stream,
    and the verifier sends them to the suspect shuffled together. So the suspect's match rate
    on controls estimates its chance rate on marked queries, however often it happens to agree
    with the teacher's runners-up.

Statistics
    Let the suspect match the alternative on ``k`` of ``n`` marked queries and on ``k_c`` of
    ``n_c`` controls, and let ``q`` be its unknown chance rate. ``q_hi`` is the one-sided
    Clopper-Pearson upper bound of ``q`` at confidence ``1 - alpha``: the ``p`` with
    ``P(Binomial(n_c, p) <= k_c) = alpha``, so ``P(q > q_hi) <= alpha``. The binomial tail
    ``T = P(Binomial(n, q_hi) >= k)`` is computed exactly in log space with ``math.lgamma``.
    Because the tail grows with the rate, ``T`` is at least the tail at the true ``q`` whenever
    ``q <= q_hi``. The reported p-value is ``min(1, T + alpha)``; by the union bound, a suspect
    unrelated to the harvest reaches ``p_value <= t`` with probability at most ``t``. The
    default ``alpha`` of 1e-7 is a tenth of 1e-6, the p-value that the watermark is designed
    to reach from 500 queries. It is also the smallest p-value the verifier can report.
    NOTE: the test treats the sampled queries as independent draws. Both samples are drawn
    without replacement from the client's finite query stream, which the binomial model
    approximates.

Store layout
    Ledger keys contain a SHA-256 of the client id, never the id or an API key:
    ``wm:<client hash>:marked`` and ``wm:<client hash>:controls`` (lists, newest first, capped)
    and ``wm:<client hash>:seen:<text hash>``, which keeps a repeated query from pushing older
    entries out of the capped lists.

Gateway use, per answered classification::

    normalized = normalize_query(text)
    top_label = reply.candidates[0][0]
    alternative = watermark.alternative(normalized, reply.candidates, labels)
    marked = watermark.is_marked(normalized)
    label = alternative if marked else randomizer.choose(text, reply.candidates, tier)
    if marked or watermark.is_control(normalized):
        await ledger.record(client_id, normalized, label, top_label, marked,
                            alternative=alternative)

Only the label reaches the response; the probabilities in ``candidates`` never leave the
service.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError, DataFormatError, EdgeRuntimeError
from edge_runtime.gateway.randomize import check_candidates, check_secret
from edge_runtime.gateway.state import StateStore

MAX_RATE = 0.005  # the largest share of answers the watermark may alter
DEFAULT_CONTROL_RATE = 0.03  # share of unmarked queries recorded as controls
MAX_CONTROL_RATE = 0.2
MAX_RUNNERS_UP = 4  # alternatives come from the teacher's ranks 2 to 5
DEFAULT_MAX_MARKED = 5000  # ledger entries kept per client, newest first
DEFAULT_MAX_CONTROLS = 5000
DEFAULT_LEDGER_TTL = 400 * 24 * 3600.0  # seconds a client's ledger outlives its last entry
DEFAULT_MAX_QUERIES = 500  # suspect queries per verification, controls included
DEFAULT_CONTROL_ALPHA = 1e-7  # error probability of the control rate's upper bound

_MARK_DOMAIN = b"edge-runtime watermark mark v1\x00"
_CONTROL_DOMAIN = b"edge-runtime watermark control v1\x00"
_ALTERNATIVE_DOMAIN = b"edge-runtime watermark alternative v1\x00"
_CLIENT_DOMAIN = b"edge-runtime watermark client v1\x00"


class WatermarkError(EdgeRuntimeError, ValueError):
    """A ledger or a suspect's answers cannot support a verification."""


def client_hash(client_id: str) -> str:
    """Return the hex SHA-256 of ``client_id`` that store keys and ledger files use in its place."""
    if not isinstance(client_id, str) or not client_id:
        raise ValueError("client_id must be a non-empty string")
    return hashlib.sha256(_CLIENT_DOMAIN + client_id.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Keyed decisions


class Watermark:
    """Keyed choice of the marked queries, the control queries and each query's alternative.

    Every method takes the query after ``normalize_query``, so that case and spacing variants
    of a marked query are marked too.
    """

    def __init__(self, secret: bytes, rate: float = MAX_RATE,
                 control_rate: float = DEFAULT_CONTROL_RATE):
        self._secret = check_secret(secret, name="watermark secret")
        if not _is_number(rate) or not 0.0 <= rate <= MAX_RATE:
            raise ConfigError(
                f"watermark rate must be in [0, {MAX_RATE}], got {rate!r}; every marked query "
                "is a wrong answer to an honest client, so keep the rate at or below "
                f"{MAX_RATE}"
            )
        if not _is_number(control_rate) or not 0.0 < control_rate <= MAX_CONTROL_RATE:
            raise ConfigError(
                f"watermark control_rate must be above 0 and at most {MAX_CONTROL_RATE}, got "
                f"{control_rate!r}"
            )
        self.rate = float(rate)
        self.control_rate = float(control_rate)

    def __repr__(self) -> str:  # the secret stays out of reprs and logs
        return f"Watermark(rate={self.rate}, control_rate={self.control_rate})"

    def is_marked(self, normalized: str) -> bool:
        """Return True for the keyed ``rate`` share of queries that get the alternative."""
        return self._uniform(_MARK_DOMAIN, normalized) < self.rate

    def is_control(self, normalized: str) -> bool:
        """Return True for a keyed ``control_rate`` share of the unmarked queries."""
        if self.is_marked(normalized):
            return False
        return self._uniform(_CONTROL_DOMAIN, normalized) < self.control_rate

    def alternative(self, normalized: str, candidates: Sequence[tuple[str, float]],
                    labels: Sequence[str]) -> str:
        """Return the query's alternative answer, a label other than the teacher's top-1.

        The choice is keyed and uniform among the runners-up in ``candidates`` (the teacher's
        (label, probability) pairs, best first; ranks 2 to 5 are used). With a single
        candidate, it is uniform among the other ``labels``. Raises ValueError when no label
        other than the top-1 exists.
        """
        check_candidates(candidates)
        top_label = candidates[0][0]
        pool = [label for label, _ in candidates[1:1 + MAX_RUNNERS_UP]]
        if not pool:
            if isinstance(labels, str) or not all(isinstance(label, str) for label in labels):
                raise ValueError("labels must be a sequence of label strings")
            pool = sorted({label for label in labels if label != top_label})
        if not pool:
            raise ValueError(
                f"no alternative to {top_label!r}: candidates contain one label and labels "
                "contains no other"
            )
        digest = self._digest(_ALTERNATIVE_DOMAIN, normalized)
        return pool[int.from_bytes(digest[:8], "big") % len(pool)]

    def _digest(self, domain: bytes, normalized: str) -> bytes:
        if not isinstance(normalized, str):
            raise TypeError("the normalized query must be a string")
        message = domain + normalized.encode("utf-8")
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def _uniform(self, domain: bytes, normalized: str) -> float:
        """Map the query to [0, 1) with 64 bits of its HMAC."""
        return int.from_bytes(self._digest(domain, normalized)[:8], "big") / 2.0**64


# ---------------------------------------------------------------------------------------------
# Ledger


@dataclass(frozen=True)
class LedgerEntry:
    """One recorded query of one client.

    ``alternative`` is the watermark's alternative for the query: the label given when
    ``marked``, and the label that would have been given for a control. ``recorded_at`` is a
    Unix time in seconds.
    """

    client: str  # client_hash() of the client id
    text: str  # the normalized query
    given_label: str
    top_label: str
    alternative: str
    marked: bool
    recorded_at: float


class WatermarkLedger:
    """Per-client record of marked and control queries in a StateStore.

    Each client keeps its ``max_marked`` newest marked entries and ``max_controls`` newest
    controls. A repeated query is recorded once. The ledger expires ``ttl_seconds`` after the
    client's last recorded entry.
    """

    def __init__(self, store: StateStore, *, max_marked: int = DEFAULT_MAX_MARKED,
                 max_controls: int = DEFAULT_MAX_CONTROLS,
                 ttl_seconds: float | None = DEFAULT_LEDGER_TTL,
                 clock: Callable[[], float] = time.time):
        for name, value in (("max_marked", max_marked), ("max_controls", max_controls)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer of at least 1, got {value!r}")
        if ttl_seconds is not None and (not _is_number(ttl_seconds) or ttl_seconds <= 0):
            raise ConfigError(f"ttl_seconds must be a positive number or None, got "
                              f"{ttl_seconds!r}")
        self.store = store
        self.max_marked = max_marked
        self.max_controls = max_controls
        self.ttl_seconds = ttl_seconds
        self._clock = clock

    async def record(self, client_id: str, normalized_text: str, given_label: str,
                     top_label: str, marked: bool, *, alternative: str | None = None) -> bool:
        """Record a marked query or a control; return False when the query was already recorded.

        For a marked query, ``given_label`` is the alternative that was answered. For a
        control, pass the watermark's ``alternative`` for it. Raises ValueError when a label
        is missing or an alternative equals the top-1 label.
        """
        for name, value in (("normalized_text", normalized_text), ("given_label", given_label),
                            ("top_label", top_label)):
            if not isinstance(value, str) or (name != "normalized_text" and not value):
                raise ValueError(f"{name} must be a non-empty string")
        if marked:
            if alternative is not None and alternative != given_label:
                raise ValueError("a marked query's alternative is the label it was given; "
                                 "pass the same label or leave alternative out")
            alternative = given_label
        elif not isinstance(alternative, str) or not alternative:
            raise ValueError("a control needs the watermark's alternative for the query; pass "
                             "alternative=watermark.alternative(normalized, candidates, labels)")
        if alternative == top_label:
            raise ValueError("the alternative equals the top-1 label; it must differ from it")

        client = client_hash(client_id)
        text_digest = hashlib.sha256(normalized_text.encode("utf-8")).hexdigest()[:32]
        seen_key = f"wm:{client}:seen:{text_digest}"
        if await self.store.get(seen_key) is not None:
            return False

        entry = LedgerEntry(client=client, text=normalized_text, given_label=given_label,
                            top_label=top_label, alternative=alternative, marked=bool(marked),
                            recorded_at=self._clock())
        if marked:
            await self.store.append(f"wm:{client}:marked", _entry_json(entry), self.max_marked,
                                    self.ttl_seconds)
        else:
            await self.store.append(f"wm:{client}:controls", _entry_json(entry),
                                    self.max_controls, self.ttl_seconds)
        # Set after the append: if the append fails, a later repeat of the query records it.
        await self.store.set(seen_key, "1", self.ttl_seconds)
        return True

    async def entries(self, client_id: str) -> list[LedgerEntry]:
        """Return the client's marked entries, then its controls, each newest first."""
        client = client_hash(client_id)
        found = []
        for kind in ("marked", "controls"):
            for item in await self.store.items(f"wm:{client}:{kind}"):
                found.append(_entry_from_dict(json.loads(item), f"store key wm:{client}:{kind}"))
        return found

    async def export(self, client_id: str, path: str | Path) -> int:
        """Write the client's entries to ``path`` as JSON Lines; return how many were written."""
        found = await self.entries(client_id)
        with open(path, "w", encoding="utf-8") as out:
            for entry in found:
                out.write(_entry_json(entry) + "\n")
        return len(found)

    @staticmethod
    def load(path: str | Path) -> list[LedgerEntry]:
        """Read entries written by ``export``; files of several clients may be concatenated.

        Raises DataFormatError with the line and field of the first invalid entry.
        """
        entries = []
        with open(path, encoding="utf-8") as source:
            for line_number, line in enumerate(source, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataFormatError(path, line_number, None,
                                          f"invalid JSON: {exc.msg}") from None
                entries.append(_entry_from_dict(record, path, line_number))
        return entries


_ENTRY_FIELDS = {"client": str, "text": str, "given_label": str, "top_label": str,
                 "alternative": str, "marked": bool, "recorded_at": float}


def _entry_json(entry: LedgerEntry) -> str:
    return json.dumps(asdict(entry), ensure_ascii=False, separators=(",", ":"))


def _entry_from_dict(record: Any, source: str | Path, line: int | None = None) -> LedgerEntry:
    if not isinstance(record, dict):
        raise DataFormatError(source, line, None, "expected a JSON object per ledger entry")
    values = {}
    for name, kind in _ENTRY_FIELDS.items():
        value = record.get(name)
        if kind is float:
            valid = _is_number(value) and math.isfinite(value)
        else:
            valid = isinstance(value, kind)
        if not valid:
            raise DataFormatError(source, line, name,
                                  f"missing or not a {kind.__name__} in the ledger entry")
        values[name] = float(value) if kind is float else value
    return LedgerEntry(**values)


# ---------------------------------------------------------------------------------------------
# Binomial statistics


def _log_binomial_pmf(i: int, n: int, p: float) -> float:
    log_choose = math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
    return log_choose + i * math.log(p) + (n - i) * math.log1p(-p)


def _sum_pmf(first: int, last: int, n: int, p: float) -> float:
    """Return P(first <= X <= last) for X ~ Binomial(n, p), with 0 < p < 1."""
    logs = [_log_binomial_pmf(i, n, p) for i in range(first, last + 1)]
    if not logs:
        return 0.0
    peak = max(logs)
    total = math.exp(peak) * math.fsum(math.exp(value - peak) for value in logs)
    return min(1.0, total)


def _check_counts(k: int, n: int, p: float) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not isinstance(k, int) or isinstance(k, bool):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not _is_number(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")


def binomial_tail(k: int, n: int, p: float) -> float:
    """Return P(X >= k) for X ~ Binomial(n, p), summed exactly in log space."""
    _check_counts(k, n, p)
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    return _sum_pmf(k, n, n, p)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """Return P(X <= k) for X ~ Binomial(n, p), summed exactly in log space."""
    _check_counts(k, n, p)
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p == 0.0:
        return 1.0
    if p == 1.0:
        return 0.0
    return _sum_pmf(0, k, n, p)


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """Return the one-sided Clopper-Pearson upper bound of a rate at confidence 1 - alpha.

    The bound is the rate ``p`` at which ``P(Binomial(n, p) <= k) = alpha``, found by
    bisection and rounded up, so it is never below the exact bound. It is 1 when ``n`` is 0
    or ``k`` equals ``n``.
    """
    _check_counts(k, n, 0.0)
    if not _is_number(alpha) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n], got k={k!r}, n={n!r}")
    if n == 0 or k == n:
        return 1.0
    low, high = 0.0, 1.0  # P(X <= k) falls from 1 at p = 0 to 0 at p = 1
    for _ in range(200):
        middle = (low + high) / 2.0
        if middle in (low, high):
            break
        if binomial_cdf(k, n, middle) > alpha:
            low = middle
        else:
            high = middle
    return high


# ---------------------------------------------------------------------------------------------
# Verification

Suspect = Callable[[Sequence[str]], Sequence[str]]


@dataclass(frozen=True)
class Verification:
    """The outcome of sending a client's marked and control queries to a suspect model.

    ``p_value`` is ``min(1, binomial_tail + control_alpha)``; the module docstring derives it.
    """

    n: int  # marked queries sent
    matches: int  # marked queries answered with the alternative
    match_rate: float
    control_n: int
    control_matches: int
    control_rate: float
    control_upper: float  # Clopper-Pearson upper bound of the chance rate
    control_alpha: float
    binomial_tail: float  # P(Binomial(n, control_upper) >= matches)
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify_suspect(entries: Sequence[LedgerEntry], suspect: Suspect, *,
                   max_queries: int = DEFAULT_MAX_QUERIES,
                   control_alpha: float = DEFAULT_CONTROL_ALPHA,
                   seed: int = 0) -> Verification:
    """Send a client's marked and control queries to ``suspect`` and test for the watermark.

    ``entries`` are one client's ledger entries. ``suspect`` maps a list of normalized
    queries to one label each, and is called once with at most ``max_queries`` queries, the
    marked and control ones shuffled together. Marked queries get up to half of the queries,
    or more when there are too few controls to fill the rest. ``seed`` fixes the sample.
    Raises WatermarkError when the entries hold no marked query or no control, or the suspect
    returns the wrong number of labels.
    """
    if not isinstance(max_queries, int) or isinstance(max_queries, bool) or max_queries < 2:
        raise ValueError(f"max_queries must be an integer of at least 2, got {max_queries!r}")
    if not _is_number(control_alpha) or not 0.0 < control_alpha < 1.0:
        raise ValueError(f"control_alpha must be in (0, 1), got {control_alpha!r}")
    clients = {entry.client for entry in entries}
    if len(clients) > 1:
        raise WatermarkError(f"the entries belong to {len(clients)} clients; verify one client "
                             "at a time")

    marked, controls = _split_entries(entries)
    if not marked or not controls:
        raise WatermarkError(
            f"the ledger contains {len(marked)} marked queries and {len(controls)} controls for "
            "this client in the period that both cover; a verification needs at least one of "
            "each"
        )

    n_controls = min(len(controls), max_queries - min(len(marked), max_queries // 2))
    n_marked = min(len(marked), max_queries - n_controls)
    rng = random.Random(seed)
    chosen = [(entry, True) for entry in rng.sample(marked, n_marked)]
    chosen += [(entry, False) for entry in rng.sample(controls, n_controls)]
    rng.shuffle(chosen)

    labels = list(suspect([entry.text for entry, _ in chosen]))
    if len(labels) != len(chosen):
        raise WatermarkError(f"the suspect returned {len(labels)} labels for {len(chosen)} "
                             "queries; it must return one label per query")

    matches = control_matches = 0
    for (entry, is_marked), label in zip(chosen, labels, strict=True):
        if label == entry.alternative:
            if is_marked:
                matches += 1
            else:
                control_matches += 1

    control_upper = clopper_pearson_upper(control_matches, n_controls, control_alpha)
    tail = binomial_tail(matches, n_marked, control_upper)
    return Verification(
        n=n_marked, matches=matches, match_rate=matches / n_marked,
        control_n=n_controls, control_matches=control_matches,
        control_rate=control_matches / n_controls, control_upper=control_upper,
        control_alpha=control_alpha, binomial_tail=tail,
        p_value=min(1.0, tail + control_alpha),
    )


def _split_entries(entries: Sequence[LedgerEntry]) -> tuple[list[LedgerEntry], list[LedgerEntry]]:
    """Split entries into marked and controls, one per query, from a common time window.

    The ledger caps both lists at their newest entries, so one list can reach further back
    than the other. Entries older than the later of the two oldest entries are dropped, so
    that a client whose queries drift over time has marked and control queries from the
    same period.
    """
    marked: dict[str, LedgerEntry] = {}
    controls: dict[str, LedgerEntry] = {}
    for entry in entries:
        target = marked if entry.marked else controls
        target.setdefault(entry.text, entry)
    for text in marked:
        controls.pop(text, None)
    if not marked or not controls:
        return list(marked.values()), list(controls.values())

    start = max(min(entry.recorded_at for entry in marked.values()),
                min(entry.recorded_at for entry in controls.values()))
    return ([entry for entry in marked.values() if entry.recorded_at >= start],
            [entry for entry in controls.values() if entry.recorded_at >= start])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
