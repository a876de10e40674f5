"""A fake hosted LLM: an OpenAI-compatible chat completions server for tests and demos.

It is not a language model and is meant only as a substitute for a hosted chat API behind
``OpenAIChatBackend``. It serves ``POST /v1/chat/completions`` and ``GET /v1/models`` on
127.0.0.1 over real HTTP (Starlette on uvicorn) and answers from the request by fixed rules:

- With tools, it calls the tool whose name and description share the most words with the last
  user message, the first such tool on a tie. It fills each required argument from the message
  (see ``_example_value``). When no tool shares a word, it answers with text instead, unless
  ``tool_choice`` is ``"required"`` or names a tool. ``tool_choice: "none"`` turns tools off.
- Otherwise, when the system message has bulleted lines (``- label``), it answers with the
  label that shares the most words with the message, the first label on a tie.
- Otherwise it echoes the last user message.
- When the last message is a tool result, ``FakeOpenAIModes.after_tool_result`` can make it
  reply with text that quotes the result, or call another tool; by default the rules above
  apply as if the tool result were not there.

``FakeOpenAIModes`` sets the bearer key to require and the failure modes: an error status, a
delay, a body dripped in small chunks, malformed JSON, an oversized body, or a call to a tool
that was not offered. ``running_fake_openai`` starts the server in a background thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = 10.0  # seconds
STOP_TIMEOUT = 5.0  # seconds to wait for a graceful stop before forcing it
PAUSE_STEP = 0.05  # seconds between checks for a stop request during a delay or drip
OVERSIZE_CHUNK_BYTES = 64 * 1024
UNKNOWN_TOOL_NAME = "fake_tool_not_offered"
AFTER_TOOL_RESULT_MODES = ("same_rules", "text", "other_tool")
TOOL_RESULT_QUOTE_CHARS = 200  # characters of a tool result that a "text" reply quotes
# Words too common to tell tools or labels apart.
STOP_WORDS = frozenset(
    "a an and are can do for from i in is it me my of on or please the this to what with you "
    "your".split()
)


@dataclass(frozen=True)
class FakeOpenAIModes:
    """Settings and failure modes of the fake server. The defaults return a completion for every
    valid request."""

    api_key: str | None = None  # bearer key every request must carry; None accepts any request
    model: str = "fake-chat"  # the model id that GET /v1/models lists
    content: str | None = None  # fixed reply text in place of the label and echo rules
    status_code: int = 200  # any other status returns an OpenAI-style error body
    delay: float = 0.0  # seconds to wait before sending the status line
    drip_interval: float = 0.0  # seconds between body chunks; 0 sends the body at once
    drip_chunk_bytes: int = 1  # bytes per chunk when drip_interval is set
    malformed_json: bool = False  # send the first half of the JSON body with status 200
    oversize_bytes: int = 0  # pad the completion body to more than this many bytes
    oversize_declared: bool = False  # send Content-Length for the padded body, else chunked
    unknown_tool: bool = False  # call UNKNOWN_TOOL_NAME whenever tools are given
    bad_tool_arguments: bool = False  # send a JSON array as the tool call's arguments
    # The reply when the last message is a tool result. "same_rules" ignores the result, so
    # the last user message decides as before. "text" replies with text that quotes the
    # result. "other_tool" calls the best-matching tool not yet called in the conversation,
    # and replies as "text" does when no other tool shares a word with the user message.
    after_tool_result: str = "same_rules"

    def __post_init__(self) -> None:
        if not 100 <= self.status_code <= 599:
            raise ValueError(f"status_code must be an HTTP status (100-599), got "
                             f"{self.status_code}")
        for name in ("delay", "drip_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more seconds")
        if self.drip_chunk_bytes < 1:
            raise ValueError("drip_chunk_bytes must be at least 1")
        if self.oversize_bytes < 0:
            raise ValueError("oversize_bytes must be 0 or more")
        if self.after_tool_result not in AFTER_TOOL_RESULT_MODES:
            raise ValueError(f"after_tool_result must be one of {AFTER_TOOL_RESULT_MODES}, got "
                             f"{self.after_tool_result!r}")


class FakeOpenAIServer:
    """The fake server on a free 127.0.0.1 port, run by uvicorn in a background thread.

    ``requests`` collects the JSON body of every chat completions request that passed the key
    and format checks, in arrival order. Use it as a context manager or call start and stop.
    """

    def __init__(self, **modes: Any):
        self.modes = FakeOpenAIModes(**modes)
        self.requests: list[dict[str, Any]] = []
        self.base_url: str | None = None
        self._stopping = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Start serving and return the base URL, such as ``http://127.0.0.1:43121/v1``."""
        if self._thread is not None:
            raise RuntimeError("the fake OpenAI server is already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind(("127.0.0.1", 0))
        except OSError:
            sock.close()
            raise
        port = sock.getsockname()[1]

        app = create_fake_openai_app(self.modes, self.requests, self._stopping)
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name=f"fake-openai-{port}", daemon=True)
        self._thread.start()

        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the fake OpenAI server on 127.0.0.1:{port} did not start "
                                   f"within {STARTUP_TIMEOUT:.0f} s")
            time.sleep(0.01)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        log.info("fake OpenAI server listening on %s", self.base_url)
        return self.base_url

    def stop(self) -> None:
        """Stop the server and wait for its thread; open delays and drips end at once."""
        if self._server is None or self._thread is None:
            return
        self._stopping.set()
        self._server.should_exit = True
        self._thread.join(STOP_TIMEOUT)
        if self._thread.is_alive():
            log.warning("fake OpenAI server did not stop within %.0f s; forcing it", STOP_TIMEOUT)
            self._server.force_exit = True
            self._thread.join(STOP_TIMEOUT)
        log.info("fake OpenAI server stopped (%s)", self.base_url)

    def __enter__(self) -> FakeOpenAIServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_fake_openai(**modes: Any) -> Iterator[str]:
    """Run a fake OpenAI server with the given ``FakeOpenAIModes`` and yield its base URL."""
    with FakeOpenAIServer(**modes) as server:
        assert server.base_url is not None
        yield server.base_url


def create_fake_openai_app(
    modes: FakeOpenAIModes, requests: list[dict[str, Any]], stopping: threading.Event
) -> Starlette:
    """Build the fake's Starlette app; see the module docstring for its rules."""
    completion_ids = itertools.count(1)

    async def pause(seconds: float) -> None:
        # Sleeps in short steps so that stopping the server ends a long delay at once.
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while not stopping.is_set():
            remaining = end - loop.time()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, PAUSE_STEP))

    async def chat_completions(request: Request) -> Response:
        key_error = _check_api_key(request, modes.api_key)
        if key_error is not None:
            return key_error
        try:
            payload = json.loads(await request.body())
        except (UnicodeDecodeError, ValueError, RecursionError):
            return _error_response(400, "The request body is not valid JSON.")
        problem = _find_request_problem(payload)
        if problem is not None:
            return _error_response(400, problem)
        requests.append(payload)

        await pause(modes.delay)
        if modes.status_code != 200:
            return _error_response(modes.status_code, "The fake server is set to fail.")
        completion = _complete(payload, modes, next(completion_ids))
        if completion is None:
            return _error_response(400, "tool_choice names a tool that is not in tools.")
        return await _completion_response(completion, modes, pause)

    async def list_models(request: Request) -> Response:
        key_error = _check_api_key(request, modes.api_key)
        if key_error is not None:
            return key_error
        await pause(modes.delay)
        if modes.status_code != 200:
            return _error_response(modes.status_code, "The fake server is set to fail.")
        return JSONResponse({
            "object": "list",
            "data": [{"id": modes.model, "object": "model", "created": 0, "owned_by": "fake"}],
        })

    return Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
    ])


async def _completion_response(completion: dict[str, Any], modes: FakeOpenAIModes,
                               pause: Callable[[float], Awaitable[None]]) -> Response:
    if modes.oversize_bytes:
        completion["fake_padding"] = "x" * modes.oversize_bytes
    body = json.dumps(completion).encode("utf-8")
    if modes.malformed_json:
        body = body[: len(body) // 2]

    if modes.drip_interval > 0:
        async def drip() -> AsyncIterator[bytes]:
            for start in range(0, len(body), modes.drip_chunk_bytes):
                if start:
                    await pause(modes.drip_interval)
                yield body[start:start + modes.drip_chunk_bytes]

        return StreamingResponse(drip(), media_type="application/json")
    if modes.oversize_bytes and not modes.oversize_declared:
        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), OVERSIZE_CHUNK_BYTES):
                yield body[start:start + OVERSIZE_CHUNK_BYTES]

        return StreamingResponse(chunks(), media_type="application/json")
    return Response(body, media_type="application/json")


def _check_api_key(request: Request, api_key: str | None) -> Response | None:
    if api_key is None:
        return None
    if request.headers.get("authorization") != f"Bearer {api_key}":
        # Like a hosted API, the message does not repeat the key that was sent.
        return _error_response(401, "Incorrect or missing API key.", code="invalid_api_key")
    return None


def _error_response(status: int, message: str, code: str | None = None) -> JSONResponse:
    if code is None:
        code = {429: "rate_limit_exceeded"}.get(status)
    error_type = "server_error" if status >= 500 else "invalid_request_error"
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    log.info("fake OpenAI server returned HTTP %d: %s", status, message)
    return JSONResponse(body, status_code=status, headers=headers)


def _find_request_problem(payload: Any) -> str | None:
    """Return what makes ``payload`` an invalid chat completions request, or None."""
    if not isinstance(payload, dict):
        return "The request body must be a JSON object."
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        return "'model' is required and must be a non-empty string."
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' is required and must be a non-empty array."
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return "Each message must be an object with a string 'role'."
    if not any(m["role"] == "user" for m in messages):
        return "'messages' must contain a user message."
    tools = payload.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            return "'tools' must be an array."
        for tool in tools:
            if not isinstance(tool, dict):
                return "Each tool must be an object."
            function = tool.get("function")
            if (tool.get("type") != "function" or not isinstance(function, dict)
                    or not isinstance(function.get("name"), str)):
                return "Each tool must be {'type': 'function', 'function': {'name': ...}}."
    tool_choice = payload.get("tool_choice")
    if tool_choice is not None and tool_choice not in ("none", "auto", "required"):
        function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return "'tool_choice' must be 'none', 'auto', 'required' or name a function."
    return None


def _complete(payload: dict[str, Any], modes: FakeOpenAIModes,
              number: int) -> dict[str, Any] | None:
    """Build the chat completion for a valid request; None when tool_choice names no tool."""
    user_text = _message_text(next(m for m in reversed(payload["messages"])
                                   if m["role"] == "user"))
    tools = payload.get("tools") or []
    tool_choice = payload.get("tool_choice", "auto")

    last_message = payload["messages"][-1]
    if modes.after_tool_result != "same_rules" and last_message["role"] == "tool":
        return _complete_after_tool_result(payload, modes, number, user_text, last_message)

    tool = None
    if tools and tool_choice != "none":
        if isinstance(tool_choice, dict):
            requested_name = tool_choice["function"]["name"]
            tool = next((t for t in tools if t["function"]["name"] == requested_name), None)
            if tool is None:
                return None
        else:
            tool = _pick_by_overlap(
                tools, user_text,
                lambda t: f"{t['function']['name']} {t['function'].get('description', '')}",
                required=tool_choice == "required",
            )

    if tool is not None:
        return _tool_call_completion(payload, modes, number, tool, user_text)
    message = {"role": "assistant", "content": _reply_text(payload, user_text, modes)}
    return _completion(payload, number, message, "stop")


def _complete_after_tool_result(payload: dict[str, Any], modes: FakeOpenAIModes, number: int,
                                user_text: str, tool_message: dict[str, Any]
                                ) -> dict[str, Any]:
    """Build the completion that follows a tool result, by ``modes.after_tool_result``."""
    if modes.after_tool_result == "other_tool":
        called = {call.get("function", {}).get("name")
                  for message in payload["messages"] if message["role"] == "assistant"
                  for call in message.get("tool_calls") or () if isinstance(call, dict)}
        others = [tool for tool in payload.get("tools") or []
                  if tool["function"]["name"] not in called]
        tool = _pick_by_overlap(
            others, user_text,
            lambda t: f"{t['function']['name']} {t['function'].get('description', '')}",
            required=False,
        ) if others else None
        if tool is not None:
            return _tool_call_completion(payload, modes, number, tool, user_text)
    quoted = _message_text(tool_message)[:TOOL_RESULT_QUOTE_CHARS]
    message = {"role": "assistant", "content": f"Here is the result: {quoted}"}
    return _completion(payload, number, message, "stop")


def _tool_call_completion(payload: dict[str, Any], modes: FakeOpenAIModes, number: int,
                          tool: dict[str, Any], user_text: str) -> dict[str, Any]:
    function = tool["function"]
    name = UNKNOWN_TOOL_NAME if modes.unknown_tool else function["name"]
    arguments: Any = _fill_arguments(function.get("parameters") or {}, user_text)
    if modes.bad_tool_arguments:
        arguments = list(arguments.values())
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{
            "id": f"call_fake{number}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)},
        }],
    }
    return _completion(payload, number, message, "tool_calls")


def _completion(payload: dict[str, Any], number: int, message: dict[str, Any],
                finish_reason: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-fake{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": payload["model"],
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
    }


def _reply_text(payload: dict[str, Any], user_text: str, modes: FakeOpenAIModes) -> str:
    if modes.content is not None:
        return modes.content
    system_text = "\n".join(_message_text(m) for m in payload["messages"]
                            if m["role"] == "system")
    labels = re.findall(r"^[ \t]*[-*][ \t]+(.+?)[ \t]*$", system_text, flags=re.MULTILINE)
    if labels:
        return _pick_by_overlap(labels, user_text, lambda label: label, required=True)
    return user_text


def _pick_by_overlap(candidates: list[Any], text: str, describe: Callable[[Any], str],
                     required: bool) -> Any:
    """Return the first candidate whose description shares the most words with ``text``.

    With no shared word, return the first candidate if ``required``, else None.
    """
    text_words = _words(text)
    best, best_score = None, 0
    for candidate in candidates:
        score = len(text_words & _words(describe(candidate)))
        if score > best_score:
            best, best_score = candidate, score
    if best is None and required:
        return candidates[0]
    return best


def _words(text: str) -> set[str]:
    return {word for word in re.findall(r"[a-z0-9]+", text.lower()) if word not in STOP_WORDS}


def _message_text(message: dict[str, Any]) -> str:
    """Return a message's text, whether content is a string or a list of text parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content
                        if isinstance(part, dict) and part.get("type") == "text")
    return ""


def _fill_arguments(parameters: dict[str, Any], user_text: str) -> dict[str, Any]:
    properties = parameters.get("properties") or {}
    required = parameters.get("required") or []
    return {name: _example_value(properties.get(name) or {}, user_text) for name in required}


def _example_value(schema: dict[str, Any], user_text: str) -> Any:
    """Return a value for one required argument.

    The first enum value, else by type: the whole message for a string, the first number in
    the message (or 0) for a number or integer, false, [] or {}. A schema without a type gets
    the message.
    """
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type", "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind in ("integer", "number"):
        match = re.search(r"-?\d+(?:\.\d+)?", user_text)
        if match is None:
            return 0
        value = float(match.group())
        return int(value) if kind == "integer" else value
    defaults = {"boolean": False, "array": [], "object": {}, "null": None}
    return defaults.get(kind, user_text)
