"""Teacher backends: the interface the gateway calls to get the teacher's reply to one query.

``OnnxTeacherBackend`` runs a local ONNX classifier. ``OpenAIChatBackend`` calls a chat model
over the OpenAI chat completions API (``POST {base_url}/chat/completions``), which OpenAI's
hosted API and OpenAI-compatible servers such as vLLM, Ollama and llama.cpp's server accept.

A ``TeacherReply`` carries exactly one of a label, a tool call or a text, and never scores,
probabilities or rankings. Failures raise ``BackendUnavailable`` (no usable HTTP reply) or
``BackendRejected`` (a valid reply that cannot be used).
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import math
import re
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from starlette.concurrency import run_in_threadpool

from edge_runtime.errors import (
    ConfigError,
    EdgeRuntimeError,
    ModelError,
    TeacherError,
    TeacherUnavailable,
)

if TYPE_CHECKING:
    from edge_runtime.model import OnnxClassifier

log = logging.getLogger(__name__)

CANDIDATES = 5  # top labels an ONNX teacher reports to the gateway's defences
MAX_RESPONSE_BYTES = 1024 * 1024  # a chat completion is typically a few KiB
HEALTH_TIMEOUT = 2.0  # seconds for the whole GET /models, connection included
# The OpenAI API reference allows function names of 1 to 64 letters, digits, "_" and "-".
TOOL_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# An error code in an OpenAI-style error body, such as "rate_limit_exceeded". Only codes of this
# form are copied into messages, because an error body's free text can quote the API key.
ERROR_CODE_PATTERN = re.compile(r"[a-z0-9_]{1,64}")
# A bulleted (-, *, +, •) or numbered (1. or 1)) list item, after its indentation.
LIST_ITEM_PATTERN = re.compile(r"(?:[-*+•]|\d{1,9}[.)])(?:[ \t]|$)")
CODE_FENCE_PATTERN = re.compile(r"(?:```|~~~)")


class ToolSpecError(EdgeRuntimeError, ValueError):
    """A tool definition is not in the OpenAI "tools" format.

    The message names the field (``tools[1].function.name``) but never repeats its value.
    """


class BackendUnavailable(TeacherUnavailable):
    """The backend could not be reached, timed out, or sent no readable reply.

    ``status_code`` is the HTTP status when the server returned one outside 2xx, else None.
    """

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


class BackendRejected(TeacherError):
    """The backend sent valid JSON that cannot be used as a reply.

    Examples are a reply without a message, a label outside the configured labels, or a tool
    call whose name was not offered or whose arguments are not a JSON object.
    """


@dataclass(frozen=True)
class ToolSpec:
    """One function tool in the OpenAI "tools" format.

    ``parameters`` is the JSON Schema of the arguments, or None for a function without them.
    """

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = field(default=None, hash=False)

    @classmethod
    def from_openai(cls, entry: Any, where: str = "tool") -> ToolSpec:
        """Parse ``{"type": "function", "function": {"name", "description", "parameters"}}``.

        Raises ToolSpecError naming the invalid field, prefixed with ``where``.
        """
        if not isinstance(entry, Mapping):
            raise ToolSpecError(f"{where} must be a JSON object")
        if entry.get("type") != "function":
            raise ToolSpecError(f"{where}.type must be \"function\"")
        function = entry.get("function")
        if not isinstance(function, Mapping):
            raise ToolSpecError(f"{where}.function must be a JSON object")

        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME_PATTERN.fullmatch(name):
            raise ToolSpecError(
                f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-'"
            )
        description = function.get("description", "")
        if not isinstance(description, str):
            raise ToolSpecError(f"{where}.function.description must be a string")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise ToolSpecError(f"{where}.function.parameters must be a JSON Schema object")
        return cls(
            name=name,
            description=description,
            parameters=dict(parameters) if parameters is not None else None,
        )

    def to_openai(self) -> dict[str, Any]:
        """Return the tool in the OpenAI "tools" format, as sent in a chat completions request."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = self.parameters
        return {"type": "function", "function": function}


def parse_tools(entries: Any) -> list[ToolSpec]:
    """Parse an OpenAI "tools" list; raise ToolSpecError for a bad entry or a repeated name."""
    if not isinstance(entries, list):
        raise ToolSpecError("tools must be a JSON array")
    tools = []
    seen = set()
    for index, entry in enumerate(entries):
        tool = ToolSpec.from_openai(entry, where=f"tools[{index}]")
        if tool.name in seen:
            raise ToolSpecError(f"tools[{index}].function.name repeats an earlier tool's name")
        seen.add(tool.name)
        tools.append(tool)
    return tools


@dataclass(frozen=True)
class TeacherReply:
    """The teacher's reply to one query and the model that produced it.

    Exactly one of ``label``, ``tool_call`` and ``text`` is set. ``tool_call`` is
    ``{"name": str, "arguments": dict}``.

    ``candidates`` holds the classifier's top labels with their probabilities, best first,
    for the gateway's own defences (keyed randomization of near-ties, the watermark). It stays
    inside the service: the application never writes it into a response.
    """

    label: str | None
    tool_call: dict[str, Any] | None = field(hash=False)
    text: str | None
    model: str
    candidates: tuple[tuple[str, float], ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        answers = [self.label, self.tool_call, self.text]
        if sum(answer is not None for answer in answers) != 1:
            raise ValueError("a TeacherReply needs exactly one of label, tool_call and text")


class TeacherBackend(abc.ABC):
    """A teacher that the gateway can ask. Use one instance from one event loop."""

    name: str  # short backend name for logs and health output

    @abc.abstractmethod
    async def predict(
        self, text: str, tools: list[ToolSpec] | None, request_id: str
    ) -> TeacherReply:
        """Send ``text`` to the teacher and return its reply; raise a TeacherError on failure."""

    @abc.abstractmethod
    async def health(self) -> dict[str, Any]:
        """Return ``{"status": "ok", ...}`` or ``{"status": "unavailable", "reason": ...}``.

        Never raises for an unreachable or failing teacher.
        """

    async def close(self) -> None:  # noqa: B027 - a concrete default, not an abstract method
        """Release connections; the default has nothing to release."""

    async def __aenter__(self) -> TeacherBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class OnnxTeacherBackend(TeacherBackend):
    """A local ONNX classifier as the teacher, returning its top-1 label.

    A classifier cannot call tools. When ``tools`` are given, the reply still carries only the
    label and ``tool_call`` is None.
    """

    name = "onnx"

    def __init__(self, classifier: OnnxClassifier):
        self.classifier = classifier
        manifest = classifier.package.manifest
        self.model = f"{manifest.name}@{manifest.version}"

    async def predict(
        self, text: str, tools: list[ToolSpec] | None, request_id: str
    ) -> TeacherReply:
        # ONNX Runtime blocks for the whole inference, so it runs in a worker thread.
        try:
            prediction = await run_in_threadpool(self.classifier.predict, text)
        except ModelError as exc:
            log.warning("onnx predict failed request_id=%s: %s", request_id, exc)
            raise BackendUnavailable(f"teacher model {self.model} failed: {exc}") from exc
        logits = prediction.logits.astype("float64")
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        ranked = np.argsort(-probabilities, kind="stable")[:CANDIDATES]  # ties: lowest index
        candidates = tuple((self.classifier.labels[int(index)], float(probabilities[index]))
                           for index in ranked)
        log.info(
            "onnx predict request_id=%s chars=%d tools=%d ms=%.2f",
            request_id, len(text), len(tools or ()),
            prediction.tokenize_ms + prediction.inference_ms,
        )
        return TeacherReply(label=candidates[0][0], tool_call=None, text=None, model=self.model,
                            candidates=candidates)

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model}

    def __repr__(self) -> str:
        return f"OnnxTeacherBackend(model={self.model!r})"


class OpenAIChatBackend(TeacherBackend):
    """A chat model behind the OpenAI chat completions API.

    ``base_url`` includes the API version, as in ``https://api.openai.com/v1``. With ``labels``,
    the system prompt requests exactly one label and the reply must equal one of them after
    stripping whitespace, ignoring case. Without labels, a text reply is cut to
    ``max_output_chars`` characters and to ``max_list_items`` items per list (see
    ``limit_output``). A tool call must name one of the given tools, and its arguments must be
    a JSON object.
    NOTE: tool call arguments are not validated against the tool's JSON Schema.

    Each request must finish within ``connect_timeout + read_timeout`` seconds, body included.
    The API key is sent as ``Authorization: Bearer`` and kept out of logs, reprs and messages.
    """

    name = "openai-chat"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 20.0,
        max_output_chars: int = 2000,
        max_list_items: int = 10,
        labels: Sequence[str] | None = None,
        system_prompt: str | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ):
        url = _parse_base_url(base_url)
        if not isinstance(model, str) or not model.strip():
            raise ConfigError("model must be a non-empty model name, such as 'gpt-4o-mini'")
        for setting, value in (("connect_timeout", connect_timeout),
                               ("read_timeout", read_timeout)):
            if not _is_positive_number(value):
                raise ConfigError(f"{setting} must be a positive number of seconds, got {value!r}")
        for setting, value, minimum in (("max_output_chars", max_output_chars, 1),
                                        ("max_list_items", max_list_items, 0),
                                        ("max_response_bytes", max_response_bytes, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"{setting} must be an integer of at least {minimum}, "
                                  f"got {value!r}")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ConfigError("system_prompt must be a string or None")

        self.base_url = str(url).rstrip("/")
        # Messages show the URL without any user:password part.
        self._shown_url = str(url.copy_with(userinfo=b"")).rstrip("/")
        self.model = model
        self.labels = _check_labels(labels) if labels is not None else None
        self._labels_by_key = {label.strip().casefold(): label for label in self.labels or ()}
        self.system_prompt = system_prompt
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        self.max_output_chars = max_output_chars
        self.max_list_items = max_list_items
        self.max_response_bytes = max_response_bytes
        self._api_key = api_key or None
        self._last_health_status: str | None = None

        headers = {
            "User-Agent": "edge-runtime",
            "Accept": "application/json",
            # Compressed bodies would be inflated chunk by chunk without a size limit per chunk.
            "Accept-Encoding": "identity",
        }
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        # httpcore writes a POST's headers and body separately. With Nagle's algorithm on, the
        # body can wait for the server's delayed ACK (about 40 ms on Linux).
        transport = httpx.AsyncHTTPTransport(
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        )
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(self.read_timeout, connect=self.connect_timeout),
            transport=transport,
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"OpenAIChatBackend(base_url={self._shown_url!r}, model={self.model!r})"

    async def predict(
        self, text: str, tools: list[ToolSpec] | None, request_id: str
    ) -> TeacherReply:
        started = time.perf_counter()
        budget = self.connect_timeout + self.read_timeout
        try:
            status, content = await self._exchange(
                "POST", "/chat/completions", self._build_request(text, tools), request_id, budget
            )
            reply = self._parse_completion(status, content, tools)
        except TeacherError as exc:
            log.warning("openai-chat predict failed request_id=%s: %s", request_id, exc)
            raise
        if reply.tool_call is not None:
            kind = "tool_call"
        elif reply.label is not None:
            kind = "label"
        else:
            kind = "text"
        log.info(
            "openai-chat predict request_id=%s chars=%d tools=%d reply=%s ms=%.1f",
            request_id, len(text), len(tools or ()), kind,
            (time.perf_counter() - started) * 1000.0,
        )
        return reply

    async def health(self) -> dict[str, Any]:
        """Call ``GET {base_url}/models`` within HEALTH_TIMEOUT seconds."""
        try:
            status, _ = await self._exchange("GET", "/models", None, None, HEALTH_TIMEOUT)
            if not 200 <= status < 300:
                raise BackendUnavailable(f"{self._shown_url}/models returned HTTP {status}",
                                         status_code=status)
        except BackendUnavailable as exc:
            result = {"status": "unavailable", "reason": str(exc)}
        else:
            result = {"status": "ok", "model": self.model}

        # Health is polled, so only a change of status is logged.
        if result["status"] != self._last_health_status:
            level = logging.INFO if result["status"] == "ok" else logging.WARNING
            log.log(level, "openai-chat health %s: %s", result["status"],
                    result.get("reason", self._shown_url))
            self._last_health_status = result["status"]
        return result

    async def close(self) -> None:
        await self._client.aclose()

    def _build_request(self, text: str, tools: list[ToolSpec] | None) -> dict[str, Any]:
        messages = []
        system = self._system_message()
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": text})
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if tools:
            body["tools"] = [tool.to_openai() for tool in tools]
            body["tool_choice"] = "auto"
        return body

    def _system_message(self) -> str | None:
        if self.labels is None:
            return self.system_prompt
        label_lines = "\n".join(f"- {label.strip()}" for label in self.labels)
        instruction = (
            "Classify the user's message. Reply with exactly one of the following labels, "
            f"written as listed, and nothing else:\n{label_lines}"
        )
        if self.system_prompt:
            return f"{self.system_prompt}\n\n{instruction}"
        return instruction

    async def _exchange(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        request_id: str | None,
        budget: float,
    ) -> tuple[int, bytes]:
        """Send one request and read the whole reply within ``budget`` seconds.

        httpx applies its read timeout to each read, so a server that drips bytes could hold a
        request for long. The outer deadline bounds the whole exchange.
        """
        try:
            return await asyncio.wait_for(
                self._send(method, path, body, request_id), timeout=budget
            )
        except asyncio.TimeoutError:
            raise BackendUnavailable(
                f"{method} {self._shown_url}{path} did not finish within {budget:.1f} s"
            ) from None
        except httpx.TimeoutException as exc:
            raise BackendUnavailable(self._redact(
                f"{method} {self._shown_url}{path} timed out: {type(exc).__name__}"
            )) from None
        except httpx.HTTPError as exc:
            raise BackendUnavailable(self._redact(
                f"{method} {self._shown_url}{path} failed: {type(exc).__name__}: {exc}"
            )) from None

    async def _send(
        self, method: str, path: str, body: dict[str, Any] | None, request_id: str | None
    ) -> tuple[int, bytes]:
        headers = {"X-Request-Id": request_id} if request_id else {}
        content = None
        if body is not None:
            # ensure_ascii keeps an unpaired surrogate in the text from failing the encoding.
            content = json.dumps(body).encode("ascii")
            headers["Content-Type"] = "application/json"
        request = self._client.build_request(method, path, content=content, headers=headers)
        response = await self._client.send(request, stream=True)
        try:
            too_large = BackendUnavailable(
                f"{method} {self._shown_url}{path} returned more than "
                f"{self.max_response_bytes} bytes"
            )
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_response_bytes:
                raise too_large
            received = bytearray()
            async for chunk in response.aiter_bytes():
                received += chunk
                if len(received) > self.max_response_bytes:
                    raise too_large
        finally:
            await response.aclose()
        return response.status_code, bytes(received)

    def _parse_completion(
        self, status: int, content: bytes, tools: list[ToolSpec] | None
    ) -> TeacherReply:
        where = f"{self._shown_url}/chat/completions"
        if not 200 <= status < 300:
            raise BackendUnavailable(
                f"{where} returned HTTP {status}{_error_code_suffix(content)}",
                status_code=status,
            )
        try:
            body = json.loads(content)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise BackendUnavailable(f"{where} returned malformed JSON") from None

        message = _first_message(body)
        if message is None:
            raise BackendRejected(f"{where} returned no choices[0].message object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            model = self.model

        tool_calls = message.get("tool_calls")
        if tool_calls:
            if not isinstance(tool_calls, list):
                raise BackendRejected(f"{where} returned tool_calls that is not an array")
            # NOTE: a reply with several parallel tool calls is cut to its first one.
            tool_call = _parse_tool_call(tool_calls[0], tools, where)
            return TeacherReply(label=None, tool_call=tool_call, text=None, model=model)

        text = message.get("content")
        if not isinstance(text, str) or not text.strip():
            raise BackendRejected(f"{where} returned neither tool_calls nor text content")
        if self.labels is not None:
            label = self._labels_by_key.get(text.strip().casefold())
            if label is None:
                # The reply text is left out because it may quote the user's message.
                raise BackendRejected(
                    f"{where} returned a {len(text)}-character reply that matches none of the "
                    f"{len(self.labels)} labels"
                )
            return TeacherReply(label=label, tool_call=None, text=None, model=model)
        limited = limit_output(text, self.max_output_chars, self.max_list_items)
        return TeacherReply(label=None, tool_call=None, text=limited, model=model)

    def _redact(self, message: str) -> str:
        # httpx's own exception text does not include headers. This is a second guard.
        if self._api_key:
            message = message.replace(self._api_key, "[redacted]")
        return message


def limit_output(text: str, max_chars: int, max_list_items: int) -> str:
    """Keep at most ``max_list_items`` items of each list, then cut to ``max_chars`` characters.

    Lists are bulleted (``-``, ``*``, ``+``, ``•``) or numbered (``1.``, ``1)``) lines. A nested
    list counts its own items, and an item's indented lines and sublists go with it. Lines
    inside ``` or ~~~ code fences are never list items. The cut falls at the last whitespace
    when that keeps at least half of ``max_chars``, and trailing whitespace and a bare list
    marker left on the last line are stripped. The output does not mark what was removed.
    """
    return _cut_text(_limit_list_items(text, max_list_items), max_chars)


def _limit_list_items(text: str, max_items: int) -> str:
    kept: list[str] = []
    pending_blank: list[str] = []  # blank lines, kept only if a kept line follows them
    open_lists: list[list[int]] = []  # [indent, items so far] per open list, outermost first
    in_fence = False

    for line in text.split("\n"):
        stripped = line.lstrip(" \t")
        if not stripped.strip():
            pending_blank.append(line)
            continue
        indent = len(line[: len(line) - len(stripped)].expandtabs(4))
        is_fence = CODE_FENCE_PATTERN.match(stripped) is not None
        is_item = not in_fence and not is_fence and LIST_ITEM_PATTERN.match(stripped) is not None
        if is_fence:
            in_fence = not in_fence

        if is_item:
            while open_lists and open_lists[-1][0] > indent:
                open_lists.pop()
            if open_lists and open_lists[-1][0] == indent:
                open_lists[-1][1] += 1
            else:
                open_lists.append([indent, 1])
        else:
            # A line belongs to the innermost item indented less than it; a line at the
            # first item's indentation or less ends the list.
            while open_lists and open_lists[-1][0] >= indent:
                open_lists.pop()

        if any(count > max_items for _, count in open_lists):
            pending_blank.clear()
        else:
            kept.extend(pending_blank)
            pending_blank.clear()
            kept.append(line)

    kept.extend(pending_blank)
    return "\n".join(kept)


def _cut_text(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    if not text[max_chars].isspace():
        boundary = max(cut.rfind(" "), cut.rfind("\n"), cut.rfind("\t"))
        if boundary >= max_chars // 2:
            cut = cut[:boundary]
    cut = cut.rstrip()
    # A cut just after a list marker would leave a bare "-" or "3." as the last line.
    head, _, last_line = cut.rpartition("\n")
    if LIST_ITEM_PATTERN.fullmatch(last_line.strip()):
        cut = head.rstrip()
    return cut


def _parse_tool_call(
    entry: Any, tools: list[ToolSpec] | None, where: str
) -> dict[str, Any]:
    if not tools:
        raise BackendRejected(f"{where} returned a tool call, but no tools were given")
    if not isinstance(entry, Mapping):
        raise BackendRejected(f"{where} returned a tool call that is not a JSON object")
    if entry.get("type", "function") != "function":
        raise BackendRejected(f"{where} returned a tool call whose type is not \"function\"")
    function = entry.get("function")
    if not isinstance(function, Mapping):
        raise BackendRejected(f"{where} returned a tool call without a function object")

    name = function.get("name")
    if not isinstance(name, str) or name not in {tool.name for tool in tools}:
        shown = repr(name[:64]) if isinstance(name, str) else "a non-string name"
        raise BackendRejected(
            f"{where} called tool {shown}, which is not among the {len(tools)} given tools"
        )
    arguments_json = function.get("arguments")
    if not isinstance(arguments_json, str):
        raise BackendRejected(f"{where} returned tool call arguments that are not a JSON string")
    try:
        arguments = json.loads(arguments_json)
    except (ValueError, RecursionError):
        raise BackendRejected(
            f"{where} returned tool call arguments for {name!r} that are not valid JSON"
        ) from None
    if not isinstance(arguments, dict):
        raise BackendRejected(
            f"{where} returned tool call arguments for {name!r} that are not a JSON object"
        )
    return {"name": name, "arguments": arguments}


def _first_message(body: Any) -> Mapping[str, Any] | None:
    if not isinstance(body, Mapping):
        return None
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        return None
    message = choices[0].get("message")
    return message if isinstance(message, Mapping) else None


def _error_code_suffix(content: bytes) -> str:
    """Return " (code X)" or " (type X)" from an OpenAI-style error body, else ""."""
    try:
        error = json.loads(content).get("error")
        fields = [(key, error.get(key)) for key in ("code", "type")]
    except (ValueError, RecursionError, AttributeError):
        return ""
    for key, value in fields:
        if isinstance(value, str) and ERROR_CODE_PATTERN.fullmatch(value):
            return f" ({key} {value})"
    return ""


def _parse_base_url(base_url: Any) -> httpx.URL:
    example = "such as https://api.openai.com/v1 or http://127.0.0.1:8000/v1"
    if not isinstance(base_url, str):
        raise ConfigError(f"base_url must be an http or https URL, {example}")
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL:
        raise ConfigError(f"base_url is not a valid URL; use one {example}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"base_url must be an http or https URL, {example}")
    return url


def _is_positive_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    if isinstance(labels, str) or not isinstance(labels, Sequence) or not labels:
        raise ConfigError("labels must be a non-empty list of label strings")
    keys: set[str] = set()
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ConfigError("labels must be non-empty strings")
        if "\n" in label or "\r" in label:
            raise ConfigError(f"label {label!r} contains a line break; labels are one line each")
        key = label.strip().casefold()
        if key in keys:
            raise ConfigError(
                f"label {label!r} repeats another label when case and surrounding spaces are "
                "ignored, so replies could not tell them apart"
            )
        keys.add(key)
    return tuple(labels)
