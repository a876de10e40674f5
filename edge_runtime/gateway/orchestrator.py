"""The orchestrator: one teacher query with decoy tools, and deterministic checks of the reply.

The model proposes and the service decides. ``Orchestrator.run`` adds decoys from a
``DecoyFactory`` to the client's tools, calls the teacher, and checks its choice: a tool call
must name an offered tool, and a real tool's arguments must match its JSON Schema (required
keys, primitive types, enums). A failed check raises ``BackendRejected``, which the gateway
maps to 503. When the teacher calls a decoy, the strategy configured for the client's tier
decides what happens:

- ``retry_masked``: ask again without that decoy. The last of ``max_retries`` retries offers
  only the real tools, so the reply is a real tool call, a label or a text.
- ``simulate``: answer the decoy call inside the service with a plausible result and give it
  back to the teacher for a second turn (backends with ``predict_after_tool``); the teacher's
  next reply is used. Without a second turn, or if the teacher calls a decoy again, it falls
  back to ``retry_masked``.
- ``force_real``: replace the call with the real tool most similar to the decoy, mapping the
  arguments where names and types match and extracting the rest from the query. It falls
  back to ``retry_masked`` when no real tool is similar or the arguments cannot be filled.
- ``return_decoy``: send the decoy call to the client, which poisons an extraction harvest.
  It is refused for the honest tier ``"allow"``.
  NOTE: a client can drop calls to names that it did not send. Against such a client, a
  returned decoy costs it the sample and works as a canary if the name comes back later.

Every tier other than a ``return_decoy`` tier is checked once more before the reply is
returned, so an honest client never receives a decoy's name, whatever the teacher does.

An ONNX teacher is a classifier and returns only a label. ``IntentToolRouter`` turns that label
into a tool call, so decoys take part with both kinds of teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from edge_runtime.errors import ConfigError, TeacherError
from edge_runtime.gateway.backends import (
    BackendRejected,
    OpenAIChatBackend,
    TeacherBackend,
    TeacherReply,
    ToolSpec,
)
from edge_runtime.gateway.decoys import MAX_DECOYS, DecoyFactory, content_words, split_name

log = logging.getLogger(__name__)

STRATEGIES = ("retry_masked", "simulate", "force_real", "return_decoy")
HONEST_TIER = "allow"
DEFAULT_MAX_RETRIES = 2
MAX_EXTRACTED_CHARS = 200  # a string argument filled with the whole query is cut to this
ROUTER_CACHE_SIZE = 4096  # tools whose covered labels the router keeps
# Below this probability a classifier's label does not decide alone between a real tool and a
# decoy. The shipped CLINC150 teacher gives in-scope test queries a median of 0.99 and
# Wikipedia sentences a median of 0.47.
DEFAULT_MIN_CONFIDENCE = 0.5


# --- argument checks ---


def _matches_type(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        if isinstance(value, bool):
            return False
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if kind == "number":
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "null":
        return value is None
    return True  # a type this check does not know is left to the tool


def validate_arguments(parameters: Mapping[str, Any] | None, arguments: Any) -> str | None:
    """Check tool call arguments against a tool's JSON Schema; return the problem or None.

    Checked: the arguments are an object, every ``required`` key is present, top-level values
    have their property's ``type`` (one type or a list of types) and are among its ``enum``,
    and no unknown key is present when ``additionalProperties`` is false. The problem names
    the key but never repeats its value.
    NOTE: nested objects, arrays' items, formats, patterns and ranges are not checked.
    """
    if not isinstance(arguments, dict):
        return "the arguments are not a JSON object"
    if parameters is None:
        return None if not arguments else f"the tool takes no arguments, got {len(arguments)}"
    properties = parameters.get("properties")
    properties = properties if isinstance(properties, Mapping) else {}
    required = parameters.get("required")
    for key in required if isinstance(required, list) else ():
        if isinstance(key, str) and key not in arguments:
            return f"required argument {key!r} is missing"

    for key, value in arguments.items():
        schema = properties.get(key)
        if not isinstance(schema, Mapping):
            if parameters.get("additionalProperties") is False:
                return f"argument {key!r} is not a parameter of the tool"
            continue
        kind = schema.get("type")
        if isinstance(kind, str):
            kinds = [kind]
        elif isinstance(kind, list):
            kinds = kind
        else:
            kinds = []
        if kinds and not any(_matches_type(value, k) for k in kinds if isinstance(k, str)):
            return f"argument {key!r} must be of type {' or '.join(map(str, kinds))}"
        enum = schema.get("enum")
        if isinstance(enum, list) and not any(
                value == allowed and type(value) is type(allowed) for allowed in enum):
            return f"argument {key!r} is not one of its {len(enum)} allowed values"
    return None


# --- argument extraction from the query ---

_ISO_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")
_DAY_WORD = re.compile(
    r"\b(today|tomorrow|tonight|monday|tuesday|wednesday|thursday|friday|saturday|sunday)\b",
    re.IGNORECASE)
_TIME = re.compile(r"\b\d{1,2}(?::\d{2})?\s?(?:am|pm)\b|\b\d{1,2}:\d{2}\b", re.IGNORECASE)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_QUOTED = re.compile(r"\"([^\"]{1,200})\"|\u201c([^\u201d]{1,200})\u201d")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_CURRENCY_CODE = re.compile(r"\b[A-Z]{3}\b")
_CURRENCY_WORDS = {"dollar": "USD", "dollars": "USD", "euro": "EUR", "euros": "EUR",
                   "pound": "GBP", "pounds": "GBP", "yen": "JPY", "franc": "CHF",
                   "francs": "CHF", "rupee": "INR", "rupees": "INR"}
_MISSING = object()


@dataclass
class _TextValues:
    """Values found in a query, handed out in order of appearance."""

    text: str
    numbers: list[str]
    quoted: list[str]

    @classmethod
    def find(cls, text: str, mask_times: bool) -> _TextValues:
        """Find the values; with ``mask_times``, numbers inside times and emails are skipped,
        because a time or email parameter takes them."""
        masked = _ISO_DATE.sub(" ", text)
        if mask_times:
            masked = _EMAIL.sub(" ", _TIME.sub(" ", masked))
        quoted = [first or second for first, second in _QUOTED.findall(text)]
        return cls(text=text, numbers=_NUMBER.findall(masked), quoted=quoted)


def _schema_kind(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type", "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    return kind if isinstance(kind, str) else "string"


def _extract_value(name: str, schema: Mapping[str, Any], values: _TextValues,
                   required: bool) -> Any:
    """Return a value for one parameter from the query, or _MISSING."""
    text = values.text
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        lowered = text.casefold()
        for allowed in enum:
            if isinstance(allowed, str) and re.search(
                    rf"\b{re.escape(allowed.casefold().replace('_', ' '))}\b", lowered):
                return allowed
        return enum[0] if required else _MISSING

    kind = _schema_kind(schema)
    if kind in ("integer", "number"):
        while values.numbers:
            number = float(values.numbers.pop(0))
            if kind == "number":
                return number if not number.is_integer() else int(number)
            if number.is_integer():
                return int(number)
        return _MISSING
    if kind == "boolean":
        return False if required else _MISSING
    if kind == "array":
        return [] if required else _MISSING
    if kind == "object":
        return {} if required else _MISSING
    if kind != "string":
        return _MISSING

    for pattern in _string_patterns(name, schema):
        match = pattern.search(text)
        if match:
            return match.group(0)
    if "currency" in split_name(name):
        match = _CURRENCY_CODE.search(text)
        if match:
            return match.group(0)
        for word in re.findall(r"[a-z]+", text.casefold()):
            if word in _CURRENCY_WORDS:
                return _CURRENCY_WORDS[word]
    if not required:
        return _MISSING
    if values.quoted:
        return values.quoted.pop(0)
    return text.strip()[:MAX_EXTRACTED_CHARS]


def _string_patterns(name: str, schema: Mapping[str, Any]) -> list[re.Pattern[str]]:
    """Return the patterns to search for a string parameter, chosen by its name or format."""
    words = set(split_name(name))
    if schema.get("format") == "date" or "date" in words or "day" in words:
        return [_ISO_DATE, _DAY_WORD]
    if schema.get("format") in ("time", "date-time") or "time" in words:
        return [_TIME]
    if schema.get("format") == "email" or "email" in words:
        return [_EMAIL]
    return []


def extract_arguments(parameters: Mapping[str, Any] | None, text: str,
                      partial: bool = False) -> dict[str, Any] | None:
    """Fill a tool's arguments from the query text, by simple rules.

    Required parameters come first: numbers in order of appearance for integer and number
    parameters, a mentioned enum value (else the first), a date, time, email or currency
    pattern where the parameter's name or format calls for one, then quoted strings, then the
    whole query (cut to ``MAX_EXTRACTED_CHARS``). Optional parameters are filled only from an
    enum mention or a pattern. Returns None when a required value is missing, unless
    ``partial``.
    """
    if parameters is None:
        return {}
    properties = parameters.get("properties")
    properties = properties if isinstance(properties, Mapping) else {}
    required_names = parameters.get("required")
    required = [name for name in required_names if name in properties] if isinstance(
        required_names, list) else []
    mask_times = any(
        isinstance(schema, Mapping) and _schema_kind(schema) == "string"
        and any(pattern in (_TIME, _EMAIL) for pattern in _string_patterns(name, schema))
        for name, schema in properties.items())
    values = _TextValues.find(text, mask_times)

    arguments: dict[str, Any] = {}
    for name in [*required, *(name for name in properties if name not in required)]:
        schema = properties[name]
        if not isinstance(schema, Mapping):
            continue
        value = _extract_value(name, schema, values, name in required)
        if value is _MISSING:
            if name in required and not partial:
                return None
            continue
        arguments[name] = value
    return arguments


# --- routing a classifier's label to a tool ---

# Words too generic to match a label to a tool: most tool names start with one of them.
ROUTING_STOP_WORDS = frozenset(
    "get set list make create check find show give tell new current given fetch retrieve "
    "lookup look return".split()
)


def _routing_words(text: str) -> frozenset[str]:
    return content_words(text) - ROUTING_STOP_WORDS


class IntentToolRouter:
    """Turn an intent classifier's label into a tool call, for teachers that cannot call tools.

    Each real tool gets the intents whose label words it covers best (the share of a label's
    words found in the tool's name and description, at least ``min_coverage``). A query whose
    label maps to a real tool gets that tool, unless the teacher's probability for the label
    is below ``min_confidence`` and a decoy shares more words with the query. Decoys get the
    intents that no real tool claims, in the same way, and a query whose label maps to no
    real tool gets the decoy whose name and description share the most words with it (at
    least ``min_overlap``). ``ignore_labels``, such as the out-of-scope label, map to no tool.

    So decoys never take a query that the teacher confidently assigns to a real tool, and
    after ``retry_masked`` an honest client gets the same reply as without decoys. They take
    the queries that the client's tools do not cover and those the teacher is unsure of,
    which is where an extraction attacker's broad queries fall.
    """

    def __init__(self, labels: Sequence[str], *, ignore_labels: Sequence[str] = ("oos",),
                 min_coverage: float = 0.5, min_overlap: int = 1,
                 min_confidence: float = DEFAULT_MIN_CONFIDENCE):
        if isinstance(labels, str) or not labels:
            raise ConfigError("labels must be a non-empty list of label strings")
        if not 0 < min_coverage <= 1:
            raise ConfigError(f"min_coverage must be in (0, 1], got {min_coverage!r}")
        if not isinstance(min_overlap, int) or min_overlap < 1:
            raise ConfigError(f"min_overlap must be a positive integer, got {min_overlap!r}")
        if not 0 <= min_confidence <= 1:
            raise ConfigError(f"min_confidence must be in [0, 1], got {min_confidence!r}")
        ignored = set(ignore_labels)
        self.labels = tuple(labels)
        self._label_words = {label: _routing_words(label.replace("_", " "))
                             for label in self.labels if label not in ignored}
        self.min_coverage = min_coverage
        self.min_overlap = min_overlap
        self.min_confidence = min_confidence
        self._cache: OrderedDict[tuple[str, str], tuple[str, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def intents_for(self, tool: ToolSpec, exclude: frozenset[str] = frozenset()
                    ) -> tuple[str, ...]:
        """Return the labels outside ``exclude`` whose words ``tool`` covers at least
        ``min_coverage``, best covered first."""
        key = (tool.name, tool.description)
        with self._lock:
            cached = self._cache.get(key)
        if cached is None:
            cached = self._covered_labels(_routing_words(f"{tool.name} {tool.description}"))
            with self._lock:
                self._cache[key] = cached
                while len(self._cache) > ROUTER_CACHE_SIZE:
                    self._cache.popitem(last=False)
        return tuple(label for label in cached if label not in exclude)

    def _covered_labels(self, tool_words: frozenset[str]) -> tuple[str, ...]:
        scored = []
        for label, words in self._label_words.items():
            if words:
                coverage = len(words & tool_words) / len(words)
                if coverage >= self.min_coverage:
                    scored.append((-coverage, label))
        return tuple(label for _, label in sorted(scored))

    def route(self, text: str, label: str, real_tools: Sequence[ToolSpec],
              decoys: Sequence[ToolSpec], confidence: float | None = None
              ) -> dict[str, Any] | None:
        """Return ``{"name", "arguments"}`` for the query, or None to keep the label.

        ``confidence`` is the teacher's probability for ``label``. Below ``min_confidence``,
        the label is too weak to decide alone: a decoy that shares more words with the query
        than the label's real tool takes the query.
        """
        real_by_label = self._claims(real_tools, frozenset())
        query_words = _routing_words(text)
        best_decoy, decoy_overlap = self._best_lexical_match(decoys, query_words)

        if label in real_by_label:
            tool = _best_tool_for_label(real_by_label[label], self._label_words[label],
                                        query_words)
            uncertain = confidence is not None and confidence < self.min_confidence
            if (uncertain and best_decoy is not None
                    and decoy_overlap > len(query_words & _tool_words(tool))):
                call = _call_for(best_decoy, text)
                if call is not None:
                    return call
            return _call_for(tool, text)

        decoys_by_label = self._claims(decoys, frozenset(real_by_label))
        if label in decoys_by_label:
            call = _call_for(_best_tool_for_label(decoys_by_label[label],
                                                  self._label_words[label], query_words), text)
            if call is not None:
                return call
        if best_decoy is None:
            return None
        return _call_for(best_decoy, text)

    def _best_lexical_match(self, tools: Sequence[ToolSpec], query_words: frozenset[str]
                            ) -> tuple[ToolSpec | None, int]:
        """Return the first tool sharing the most words with the query, if at least
        ``min_overlap``, and the number of shared words."""
        best, best_overlap = None, self.min_overlap - 1
        for tool in tools:
            overlap = len(query_words & _tool_words(tool))
            if overlap > best_overlap:
                best, best_overlap = tool, overlap
        return best, best_overlap

    def _claims(self, tools: Sequence[ToolSpec], taken: frozenset[str]
                ) -> dict[str, list[ToolSpec]]:
        """Map each label to the tools that cover it best among the labels not ``taken``."""
        claims: dict[str, list[ToolSpec]] = {}
        for tool in tools:
            free = self.intents_for(tool, exclude=taken)
            if not free:
                continue
            tool_words = _routing_words(f"{tool.name} {tool.description}")
            best = max(len(self._label_words[label] & tool_words)
                       / len(self._label_words[label]) for label in free)
            for label in free:
                words = self._label_words[label]
                if len(words & tool_words) / len(words) >= best - 1e-9:
                    claims.setdefault(label, []).append(tool)
        return claims


def _tool_words(tool: ToolSpec) -> frozenset[str]:
    return _routing_words(f"{tool.name} {tool.description}")


def _best_tool_for_label(tools: Sequence[ToolSpec], label_words: frozenset[str],
                         query_words: frozenset[str]) -> ToolSpec:
    """Return the tool for a label among tools that cover its words equally well.

    The tool whose name is made most of the label's words wins, so label "balance" goes to a
    tool named ``balance`` and not to ``bill_balance``, which covers the label as well but
    names something more specific. Then the tool sharing the most words with the query, then
    the first one.
    """
    def rank(tool: ToolSpec) -> tuple[float, int, int]:
        name_words = _routing_words(tool.name.replace("_", " "))
        precision = len(name_words & label_words) / len(name_words) if name_words else 0.0
        return precision, len(query_words & _tool_words(tool)), -tools.index(tool)

    return max(tools, key=rank)


def _call_for(tool: ToolSpec, text: str) -> dict[str, Any] | None:
    arguments = extract_arguments(tool.parameters, text)
    if arguments is None:
        return None
    return {"name": tool.name, "arguments": arguments}


# --- a second turn with a tool result ---


@runtime_checkable
class SupportsToolResult(Protocol):
    """A backend that can continue a conversation after a tool call with the tool's result."""

    async def predict_after_tool(self, text: str, tools: list[ToolSpec],
                                 tool_call: Mapping[str, Any], result: Mapping[str, Any],
                                 request_id: str) -> TeacherReply:
        """Send the query, the teacher's tool call and the result; return the next reply."""


class OpenAIToolLoopBackend(OpenAIChatBackend):
    """``OpenAIChatBackend`` that can also send a tool result back to the model.

    The second request repeats the system and user messages, then adds the assistant message
    with the tool call and a ``tool`` message with the result, as in the OpenAI chat
    completions protocol. Its reply is parsed and limited like any other.
    """

    async def predict_after_tool(self, text: str, tools: list[ToolSpec],
                                 tool_call: Mapping[str, Any], result: Mapping[str, Any],
                                 request_id: str) -> TeacherReply:
        started = time.perf_counter()
        call_id = "call_" + hashlib.sha256(
            f"{request_id}\x00{tool_call['name']}".encode()).hexdigest()[:24]
        body = self._build_request(text, tools)
        body["messages"].append({
            "role": "assistant",
            "content": None,
            "tool_calls": [{
                "id": call_id,
                "type": "function",
                "function": {"name": tool_call["name"],
                             "arguments": json.dumps(tool_call["arguments"])},
            }],
        })
        body["messages"].append({"role": "tool", "tool_call_id": call_id,
                                 "content": json.dumps(result)})
        budget = self.connect_timeout + self.read_timeout
        try:
            status, content = await self._exchange("POST", "/chat/completions", body,
                                                   request_id, budget)
            reply = self._parse_completion(status, content, tools)
        except TeacherError as exc:
            log.warning("openai-chat second turn failed request_id=%s: %s", request_id, exc)
            raise
        log.info("openai-chat second turn request_id=%s tools=%d ms=%.1f", request_id,
                 len(tools), (time.perf_counter() - started) * 1000.0)
        return reply


# --- the orchestrator ---


@dataclass(frozen=True)
class OrchestratedReply:
    """The reply to send to the client, and what the orchestrator did to produce it.

    ``reply`` never names a decoy unless ``action`` is ``"return_decoy"``. ``decoy_chosen``
    is the first decoy the teacher called (or None), and ``retries`` the teacher calls made
    after the first. ``action`` is ``"none"`` when the teacher chose no decoy, else the
    strategy that produced ``reply``, which is ``"retry_masked"`` when another strategy fell
    back to it. ``canaries`` are decoy names that arrived in the client's own tool list.
    """

    reply: TeacherReply
    decoy_offered: bool
    decoy_chosen: str | None
    action: str
    retries: int
    strategy: str
    offered_decoys: tuple[str, ...] = ()
    canaries: tuple[str, ...] = ()


@dataclass
class _Run:
    """The state of one ``Orchestrator.run`` call."""

    text: str
    tenant: str
    request_id: str
    backend: TeacherBackend
    now: float
    key: bytes
    real: list[ToolSpec]
    decoys: list[ToolSpec]
    offered: list[ToolSpec]
    retries: int = 0
    decoy_names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        self.decoy_names = frozenset(decoy.name for decoy in self.decoys)

    def decoy_called(self, reply: TeacherReply) -> str | None:
        if reply.tool_call is not None and reply.tool_call["name"] in self.decoy_names:
            return reply.tool_call["name"]
        return None


class Orchestrator:
    """Add decoys to a query's tools, ask the teacher, check its choice and act on decoys.

    ``strategy_by_tier`` maps a client tier to one of ``STRATEGIES``. A tier that is not in
    it gets the strategy of the honest tier ``"allow"`` (``retry_masked`` if that is missing
    too), so an unknown tier never receives decoys. ``decoys_per_request`` decoys join every
    query with tools. ``router`` turns label replies into tool calls for classifier teachers.
    ``clock`` returns the Unix time that selects the decoys' rotation period.
    """

    def __init__(self, factory: DecoyFactory, strategy_by_tier: Mapping[str, str],
                 decoys_per_request: int, *, router: IntentToolRouter | None = None,
                 max_retries: int = DEFAULT_MAX_RETRIES,
                 clock: Callable[[], float] = time.time):
        for tier, strategy in strategy_by_tier.items():
            if strategy not in STRATEGIES:
                raise ConfigError(f"unknown decoy strategy {strategy!r} for tier {tier!r}; "
                                  f"use one of {', '.join(STRATEGIES)}")
        if strategy_by_tier.get(HONEST_TIER) == "return_decoy":
            raise ConfigError(f"tier {HONEST_TIER!r} cannot use 'return_decoy': honest "
                              "clients must never receive a decoy")
        if (not isinstance(decoys_per_request, int) or isinstance(decoys_per_request, bool)
                or not 0 <= decoys_per_request <= MAX_DECOYS):
            raise ConfigError(f"decoys_per_request must be an integer from 0 to {MAX_DECOYS}, "
                              f"got {decoys_per_request!r}")
        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 1:
            raise ConfigError(f"max_retries must be an integer of at least 1, got "
                              f"{max_retries!r}")
        self.factory = factory
        self.strategy_by_tier = dict(strategy_by_tier)
        self.decoys_per_request = decoys_per_request
        self.router = router
        self.max_retries = max_retries
        self._clock = clock

    def strategy_for(self, tier: str) -> str:
        """Return the decoy strategy of ``tier``; unknown tiers get the honest tier's."""
        if tier in self.strategy_by_tier:
            return self.strategy_by_tier[tier]
        return self.strategy_by_tier.get(HONEST_TIER, "retry_masked")

    async def run(self, text: str, tools: Sequence[ToolSpec] | None, tenant: str,
                  client_tier: str, backend: TeacherBackend,
                  request_id: str) -> OrchestratedReply:
        """Send one query to the teacher through ``backend`` and return the checked reply.

        Raises BackendRejected when the teacher's choice fails the checks.

        Backend errors (``BackendUnavailable``, ``BackendRejected``) propagate unchanged.
        """
        now = self._clock()
        strategy = self.strategy_for(client_tier)
        real = list(tools or ())
        canaries = tuple(self.factory.find_canaries(real, tenant, now)) if real else ()
        if canaries:
            log.warning("decoy names in a client's tool list request_id=%s tenant=%s tier=%s "
                        "count=%d", request_id, tenant, client_tier, len(canaries))

        key = self.factory.query_key(tenant, now, text)
        decoys = (self.factory.decoys(tenant, now, real, self.decoys_per_request, key, text)
                  if real else [])
        offered = self.factory.mix(real, decoys, key) if decoys else real
        state = _Run(text=text, tenant=tenant, request_id=request_id, backend=backend,
                     now=now, key=key, real=real, decoys=decoys, offered=offered)

        reply = await self._ask(state, offered)
        chosen = state.decoy_called(reply)
        action = "none"
        if chosen is not None:
            reply, action = await self._handle_decoy(state, reply, chosen, strategy)

        if strategy != "return_decoy" and _names_decoy(reply, state.decoy_names):
            # A second turn after a simulated result can name the decoy in its text. Any
            # other way a decoy could get here is a bug, and this check covers that too.
            log.error("a decoy reached the final reply request_id=%s strategy=%s; asking "
                      "again with real tools only", request_id, strategy)
            reply = await self._ask(state, state.real)
            state.retries += 1
            if _names_decoy(reply, state.decoy_names):
                raise BackendRejected("the teacher named a decoy tool with only real tools "
                                      "offered")

        if chosen is not None:
            log.info("decoy chosen request_id=%s tenant=%s tier=%s strategy=%s action=%s "
                     "retries=%d", request_id, tenant, client_tier, strategy, action,
                     state.retries)
        return OrchestratedReply(
            reply=reply,
            decoy_offered=bool(decoys),
            decoy_chosen=chosen,
            action=action,
            retries=state.retries,
            strategy=strategy,
            offered_decoys=tuple(decoy.name for decoy in decoys),
            canaries=canaries,
        )

    async def _handle_decoy(self, state: _Run, reply: TeacherReply, chosen: str,
                            strategy: str) -> tuple[TeacherReply, str]:
        if strategy == "return_decoy":
            return reply, "return_decoy"
        if strategy == "simulate":
            simulated = await self._simulate(state, reply, chosen)
            if simulated is not None:
                return simulated, "simulate"
        elif strategy == "force_real":
            forced = self._force_real(state, reply, chosen)
            if forced is not None:
                return forced, "force_real"
        return await self._retry_masked(state, {chosen}), "retry_masked"

    async def _ask(self, state: _Run, offered: list[ToolSpec]) -> TeacherReply:
        """Call the backend with ``offered`` tools, route a label reply, check the choice."""
        reply = await state.backend.predict(state.text, offered or None, state.request_id)
        if reply.label is not None and offered and self.router is not None:
            offered_names = {tool.name for tool in offered}
            call = self.router.route(
                state.text, reply.label,
                [tool for tool in state.real if tool.name in offered_names],
                [tool for tool in state.decoys if tool.name in offered_names],
                confidence=reply.candidates[0][1] if reply.candidates else None,
            )
            if call is not None:
                reply = TeacherReply(label=None, tool_call=call, text=None, model=reply.model)
        _check_choice(reply, offered, state.decoy_names)
        return reply

    async def _retry_masked(self, state: _Run, masked: set[str]) -> TeacherReply:
        """Ask again without the masked decoys; the last retry offers only real tools."""
        for attempt in range(1, self.max_retries + 1):
            if attempt == self.max_retries:
                offered = state.real
            else:
                offered = [tool for tool in state.offered if tool.name not in masked]
            reply = await self._ask(state, offered)
            state.retries += 1
            chosen = state.decoy_called(reply)
            if chosen is None:
                return reply
            masked.add(chosen)
        # The last attempt offered no decoy, and _ask rejects a call to a tool not offered.
        raise AssertionError("retry_masked ended on a decoy")

    async def _simulate(self, state: _Run, reply: TeacherReply,
                        chosen: str) -> TeacherReply | None:
        """Send the teacher a simulated result of its decoy call and return its next reply,
        or None when the backend has no second turn or the teacher calls a decoy again."""
        if not isinstance(state.backend, SupportsToolResult):
            return None
        decoy = next(tool for tool in state.decoys if tool.name == chosen)
        assert reply.tool_call is not None
        result = self.factory.simulate_result(decoy, reply.tool_call["arguments"], state.key,
                                              state.now)
        follow_up = await state.backend.predict_after_tool(
            state.text, state.offered, reply.tool_call, result, state.request_id)
        state.retries += 1
        _check_choice(follow_up, state.offered, state.decoy_names)
        if state.decoy_called(follow_up) is not None:
            return None
        return follow_up

    def _force_real(self, state: _Run, reply: TeacherReply,
                    chosen: str) -> TeacherReply | None:
        """Return a call to the real tool most similar to the decoy, or None."""
        decoy = next(tool for tool in state.decoys if tool.name == chosen)
        target = most_similar_tool(decoy, state.real, state.text)
        if target is None:
            return None
        assert reply.tool_call is not None
        arguments = map_arguments(reply.tool_call["arguments"], target, state.text)
        if arguments is None or validate_arguments(target.parameters, arguments) is not None:
            return None
        return TeacherReply(label=None, tool_call={"name": target.name, "arguments": arguments},
                            text=None, model=reply.model)


def _check_choice(reply: TeacherReply, offered: Sequence[ToolSpec],
                  decoy_names: frozenset[str]) -> None:
    """Raise BackendRejected unless a tool call names an offered tool with valid arguments.

    A decoy's arguments are not checked against its schema: the call never runs, and an
    honest client never receives it.
    """
    if reply.tool_call is None:
        return
    name = reply.tool_call.get("name")
    arguments = reply.tool_call.get("arguments")
    by_name = {tool.name: tool for tool in offered}
    if not isinstance(name, str) or name not in by_name:
        quoted_name = repr(name[:64]) if isinstance(name, str) else "a non-string name"
        raise BackendRejected(f"teacher {reply.model} called tool {quoted_name}, which is not "
                              f"among the {len(offered)} offered tools")
    if not isinstance(arguments, dict):
        raise BackendRejected(f"teacher {reply.model} called {name!r} with arguments that are "
                              "not a JSON object")
    if name in decoy_names:
        return
    problem = validate_arguments(by_name[name].parameters, arguments)
    if problem is not None:
        raise BackendRejected(f"teacher {reply.model} called {name!r} with invalid arguments: "
                              f"{problem}")


def _names_decoy(reply: TeacherReply, decoy_names: frozenset[str]) -> bool:
    """Return True when a reply calls a decoy or mentions a decoy's name in its text."""
    if reply.tool_call is not None and reply.tool_call.get("name") in decoy_names:
        return True
    if reply.text is not None:
        lowered = reply.text.casefold()
        return any(name.casefold() in lowered for name in decoy_names)
    return False


def most_similar_tool(decoy: ToolSpec, real_tools: Sequence[ToolSpec],
                      text: str) -> ToolSpec | None:
    """Return the real tool most similar to ``decoy``, or None when none is similar at all.

    Similarity is the Jaccard index of the names' words plus that of the names' and
    descriptions' words, without generic verbs such as "get". The words shared with the query
    break ties, then the order of ``real_tools``.
    """
    decoy_name = _routing_words(decoy.name)
    decoy_all = _routing_words(f"{decoy.name} {decoy.description}")
    query_words = _routing_words(text)
    best, best_score = None, (0.0, 0)
    for tool in real_tools:
        name_words = _routing_words(tool.name)
        all_words = _routing_words(f"{tool.name} {tool.description}")
        similarity = _jaccard(decoy_name, name_words) + _jaccard(decoy_all, all_words)
        score = (similarity, len(query_words & all_words))
        if similarity > 0 and score > best_score:
            best, best_score = tool, score
    return best


def _jaccard(first: frozenset[str], second: frozenset[str]) -> float:
    union = first | second
    return len(first & second) / len(union) if union else 0.0


def map_arguments(decoy_arguments: Mapping[str, Any], target: ToolSpec,
                  text: str) -> dict[str, Any] | None:
    """Map a decoy call's arguments onto ``target``'s parameters; None if a required one stays
    empty.

    A decoy argument fills a parameter with the same name words, or sharing a word with it
    (``target_amount`` and ``amount``), when its value has the parameter's type. Parameters
    left empty are extracted from the query as in ``extract_arguments``.
    """
    parameters = target.parameters or {}
    properties = parameters.get("properties")
    properties = properties if isinstance(properties, Mapping) else {}
    arguments = extract_arguments(target.parameters, text, partial=True) or {}
    decoy_words = {key: set(split_name(key)) for key in decoy_arguments}

    for name, schema in properties.items():
        if not isinstance(schema, Mapping):
            continue
        words = set(split_name(name))
        candidates = [key for key in decoy_arguments if decoy_words[key] == words]
        candidates += [key for key in decoy_arguments
                       if key not in candidates and decoy_words[key] & words]
        for key in candidates:
            value = decoy_arguments[key]
            if validate_arguments({"properties": {name: schema}}, {name: value}) is None:
                arguments[name] = value
                break

    required = parameters.get("required")
    if isinstance(required, list) and any(name not in arguments for name in required):
        return None
    return arguments
