"""The teacher gateway's HTTP application (Starlette).

Endpoints:

- ``POST /v1/predict`` with ``Authorization: Bearer <key>`` and ``{"text": "...", "tools":
  [...]?}`` returns ``{"label" | "tool_call" | "text", "request_id", "model_version",
  "notice"}``: the top-1 answer only, never scores, probabilities or rankings.
- ``GET /healthz`` reports the teacher backend's and the rate limiter's state (503 when either
  is down).
- ``GET /metrics``: counters and histograms in the Prometheus text format.

Order of the checks on ``/v1/predict``: the per-address rate limit (so that guessing keys is
limited too), the API key, the per-key rate limit, the client's tier from the extraction
monitor (403 when blocked), the degrade limit for a degraded client, the body size, the JSON
and its fields, then the teacher. Every refusal is an RFC 9457 problem body
(``application/problem+json``) with fixed text that names the field but never echoes the
request; an unexpected exception is logged with its request id and returns 500 without a
stack trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edge_runtime.gateway.backends import (
    BackendRejected,
    BackendUnavailable,
    TeacherBackend,
    TeacherReply,
    ToolSpecError,
    parse_tools,
)
from edge_runtime.gateway.config import GatewayConfig, LimitsConfig
from edge_runtime.gateway.defences import ClientBlocked, Defences, DefenceStateUnavailable
from edge_runtime.gateway.keys import ApiKeyRecord, ApiKeyStore, parse_authorization
from edge_runtime.gateway.monitor import DEGRADE
from edge_runtime.gateway.observability import METRICS_CONTENT_TYPE, GatewayMetrics
from edge_runtime.gateway.ratelimit import (
    Decision,
    RateLimiter,
    RateLimiterUnavailable,
    RateLimitPolicy,
    rate_limit_headers,
    retry_after_header,
)

log = logging.getLogger(__name__)

TERMS_NOTICE = (
    "Outputs of this service may not be used to train, distil or evaluate other models."
)
PROBLEM_MEDIA_TYPE = "application/problem+json"
# A request id sent by the client is kept only if it is short and uses a few plain characters,
# so that it cannot forge log lines or headers.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")
ANSWER_FIELDS = ("label", "tool_call", "text")
DEGRADED_POLICY = "degraded"  # name of the degrade limit in RateLimit headers and metrics
BLOCKED_DETAIL = ("This client is suspended because its queries look like model extraction; "
                  "contact the operator of this service.")


class Refusal(Exception):
    """A request the gateway refuses, with the status and problem text to send back."""

    def __init__(self, status: int, title: str, detail: str,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers or {}


def problem(status: int, title: str, detail: str, request_id: str,
            headers: dict[str, str] | None = None) -> JSONResponse:
    body = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "request_id": request_id,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE,
                        headers={"X-Terms-Notice": TERMS_NOTICE, **(headers or {})})


def create_app(
    config: GatewayConfig,
    backend: TeacherBackend,
    limiter: RateLimiter | None,
    model_version: str,
    metrics: GatewayMetrics | None = None,
    defences: Defences | None = None,
) -> Starlette:
    """Build the gateway around a teacher backend and a rate limiter (None: no limits).

    ``model_version`` is reported with every answer (for example ``clinc150-teacher@3``).
    The application closes the backend and the limiter when it shuts down.
    """
    metrics = metrics or GatewayMetrics()
    keys = ApiKeyStore.from_config(config)
    limits = config.limits
    id_header = config.server.request_id_header
    on_limiter_error = config.rate_limit.on_backend_error
    body_timeout = config.server.body_timeout
    address_policy = RateLimitPolicy("address", config.rate_limit.per_address.rate,
                                     config.rate_limit.per_address.burst)
    tier_policies = {name: RateLimitPolicy("key", tier.rate, tier.burst)
                     for name, tier in config.tiers.items()}
    # Only the monitor puts clients in the degrade tier, and only a limiter can slow them.
    degrade_policy = None
    if limiter is not None and defences is not None and defences.monitor is not None:
        degrade_policy = RateLimitPolicy(DEGRADED_POLICY, config.defences.degrade_rate,
                                         config.defences.degrade_burst)
    if not config.auth_required:
        log.warning("no API keys are configured, so the gateway accepts requests without "
                    "one; add [[keys]] entries to the config before serving beyond this host")

    async def hit_limit(key: str, policy: RateLimitPolicy, decisions: list[Decision],
                        request_id: str) -> Decision | None:
        """Count the request under ``policy`` and return the decision, or None when no
        limiter decided."""
        if limiter is None:
            return None
        try:
            decision = await limiter.hit(key, policy)
        except RateLimiterUnavailable as exc:
            action = "open" if on_limiter_error == "open" else "closed"
            metrics.limiter_errors.labels(action=action).inc()
            log.error("rate limiter unavailable, failing %s: %s", action, exc,
                      extra={"request_id": request_id})
            if action == "open":
                return None
            raise Refusal(503, "Service unavailable",
                          "The rate limiter is unavailable; retry later.",
                          {"Retry-After": "1"}) from None
        decisions.append(decision)
        return decision

    def refuse_if_limited(decision: Decision | None, decisions: list[Decision]) -> None:
        if decision is None or decision.allowed:
            return
        metrics.rate_limited.labels(policy=decision.policy.name).inc()
        raise Refusal(429, "Too many requests",
                      f"The {decision.policy.name} rate limit is exhausted; retry after the "
                      "time in Retry-After.",
                      {**rate_limit_headers(decisions),
                       "Retry-After": retry_after_header(decisions)})

    async def check_rate(key: str, policy: RateLimitPolicy, decisions: list[Decision],
                         request_id: str) -> None:
        refuse_if_limited(await hit_limit(key, policy, decisions, request_id), decisions)

    async def check_degrade_rate(client_id: str, decisions: list[Decision],
                                 request_id: str) -> None:
        """Apply the degrade limit to a degraded client, and let the defences count it."""
        decision = await hit_limit(f"degraded:{client_id}", degrade_policy, decisions,
                                   request_id)
        if decision is None:
            return
        try:
            await defences.note_degraded_request(client_id, decision, request_id)
        except DefenceStateUnavailable:
            raise Refusal(503, "Service unavailable",
                          "The gateway's state store is unavailable; retry later.",
                          {"Retry-After": "1"}) from None
        refuse_if_limited(decision, decisions)

    async def admit(client_id: str, request_id: str) -> str:
        try:
            return await defences.admit(client_id, request_id)
        except ClientBlocked:
            raise Refusal(403, "Forbidden", BLOCKED_DETAIL) from None
        except DefenceStateUnavailable:
            raise Refusal(503, "Service unavailable",
                          "The gateway's state store is unavailable; retry later.",
                          {"Retry-After": "1"}) from None

    def authenticate(request: Request) -> ApiKeyRecord | None:
        if not config.auth_required:
            return None
        header = request.headers.get("authorization")
        presented = parse_authorization(header) if header is not None else None
        if presented is None:
            metrics.auth_failures.labels(reason="missing").inc()
            raise Refusal(401, "Unauthorized",
                          "Send an API key as 'Authorization: Bearer <key>'.",
                          {"WWW-Authenticate": 'Bearer realm="edge-gateway"'})
        record = keys.lookup(presented)
        if record is None:
            metrics.auth_failures.labels(reason="unknown").inc()
            raise Refusal(401, "Unauthorized", "The API key is not valid.",
                          {"WWW-Authenticate": 'Bearer realm="edge-gateway", '
                                               'error="invalid_token"'})
        return record

    async def predict(request: Request) -> Response:
        request_id = _request_id(request, id_header)
        client = request.client.host if request.client else "unknown"
        decisions: list[Decision] = []
        record = None
        try:
            await check_rate(f"address:{client}", address_policy, decisions, request_id)
            record = authenticate(request)
            if record is not None:
                await check_rate(f"key:{record.id}", tier_policies[record.tier], decisions,
                                 request_id)
            client_id = f"key:{record.id}" if record is not None else f"address:{client}"
            tier = await admit(client_id, request_id) if defences is not None else "allow"
            if tier == DEGRADE and degrade_policy is not None:
                await check_degrade_rate(client_id, decisions, request_id)
            text, tools = await _read_query(request, limits, body_timeout)
            if defences is not None:
                tenant = record.tenant if record is not None else "default"
                try:
                    reply = await defences.ask(backend, text, tools, client_id, tenant, tier,
                                               request_id)
                except ClientBlocked:
                    raise Refusal(403, "Forbidden", BLOCKED_DETAIL) from None
                except DefenceStateUnavailable:
                    raise Refusal(503, "Service unavailable",
                                  "The gateway's state store is unavailable; retry later.",
                                  {"Retry-After": "1"}) from None
            else:
                reply = await backend.predict(text, tools, request_id)
            if defences is not None:
                try:
                    reply = await defences.answer(client_id, text, reply, tier, request_id)
                    await defences.record(client_id, text, reply, request_id)
                except DefenceStateUnavailable:
                    raise Refusal(503, "Service unavailable",
                                  "The gateway's state store is unavailable; retry later.",
                                  {"Retry-After": "1"}) from None
            body = _answer_body(reply, request_id, model_version)
        except Refusal as refusal:
            if refusal.status in (400, 413):
                metrics.invalid_requests.labels(status=str(refusal.status)).inc()
            log.info("request rejected: %s", refusal.title, extra={
                "request_id": request_id, "status": refusal.status, "client": client,
                "key_id": record.id if record else None,
                "tenant": record.tenant if record else None})
            headers = {**rate_limit_headers(decisions), **refusal.headers}
            return problem(refusal.status, refusal.title, refusal.detail, request_id, headers)
        except BackendUnavailable as exc:
            metrics.backend_errors.labels(kind="unavailable").inc()
            log.error("teacher backend unavailable: %s", exc, extra={"request_id": request_id})
            return problem(503, "Teacher unavailable",
                           "The teacher is unavailable; retry later.", request_id,
                           {**rate_limit_headers(decisions), "Retry-After": "1"})
        except BackendRejected as exc:
            metrics.backend_errors.labels(kind="rejected").inc()
            log.error("teacher backend reply unusable: %s", exc,
                      extra={"request_id": request_id})
            return problem(503, "Teacher unavailable",
                           "The teacher is unavailable; retry later.", request_id,
                           {**rate_limit_headers(decisions), "Retry-After": "1"})
        log.info("answered", extra={
            "request_id": request_id, "key_id": record.id if record else None,
            "tenant": record.tenant if record else None,
            "answer": next(name for name in ANSWER_FIELDS if name in body)})
        return JSONResponse(body, headers={**rate_limit_headers(decisions),
                                           "X-Terms-Notice": TERMS_NOTICE})

    async def healthz(request: Request) -> Response:
        # Reasons (upstream URLs, errors) go to the logs only: /healthz is not authenticated.
        backend_ok = (await backend.health()).get("status") == "ok"
        limiter_ok = await limiter.ping() if limiter is not None else True
        metrics.backend_up.set(1 if backend_ok else 0)
        # A limiter that fails open still lets requests through, so this replica can serve.
        limiter_state = "ok" if limiter_ok else (
            "degraded" if on_limiter_error == "open" else "unavailable")
        serving = backend_ok and limiter_state != "unavailable"
        if not serving:
            status = "unavailable"
        elif limiter_ok:
            status = "ok"
        else:
            status = "degraded"
        body = {
            "status": status,
            "model_version": model_version,
            "backend": {"status": "ok" if backend_ok else "unavailable"},
            "rate_limiter": {"backend": limiter.backend if limiter is not None else "off",
                             "status": limiter_state},
        }
        return JSONResponse(body, status_code=200 if serving else 503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def not_found(request: Request, exc: Exception) -> Response:
        request_id = _request_id(request, id_header)
        return problem(404, "Not found", "No such endpoint.", request_id,
                       {id_header: request_id})

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        request_id = _request_id(request, id_header)
        headers = {id_header: request_id}
        allowed = getattr(exc, "headers", None) or {}
        if "Allow" in allowed:  # Starlette names the route's methods; RFC 9110 requires them
            headers["Allow"] = allowed["Allow"]
        return problem(405, "Method not allowed", "This endpoint does not accept that method.",
                       request_id, headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        request_id = _request_id(request, id_header)
        log.exception("unhandled error", extra={"request_id": request_id})
        return problem(500, "Internal error", "The server failed to process the request.",
                       request_id, {id_header: request_id})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await backend.close()
            if limiter is not None:
                await limiter.close()
            if defences is not None:
                await defences.close()

    app = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/v1/predict", _timed(predict, "/v1/predict", metrics, id_header),
                  methods=["POST"]),
            Route("/healthz", _timed(healthz, "/healthz", metrics, id_header), methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: method_not_allowed, Exception: server_error},
    )
    # "/v1/predict/" gets a 404 problem body, not a redirect with an empty body.
    app.router.redirect_slashes = False
    app.state.metrics = metrics
    app.state.request_id_header = id_header
    return app


def _timed(handler: Callable[[Request], Awaitable[Response]], route: str,
           metrics: GatewayMetrics, id_header: str) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler so that its status and duration reach the metrics, and its response
    carries the request id."""

    async def wrapper(request: Request) -> Response:
        started = time.perf_counter()
        response = await handler(request)
        response.headers[id_header] = _request_id(request, id_header)
        response.headers["X-Terms-Notice"] = TERMS_NOTICE
        metrics.observe(route, response.status_code, time.perf_counter() - started)
        return response

    return wrapper


def _request_id(request: Request, header: str) -> str:
    cached = request.scope.get("edge_request_id")
    if cached is None:
        offered = request.headers.get(header, "")
        cached = offered if _CLIENT_REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
        request.scope["edge_request_id"] = cached
    return cached


async def _read_query(request: Request, limits: LimitsConfig, body_timeout: float
                      ) -> tuple[str, list[Any] | None]:
    try:
        body = await asyncio.wait_for(_read_body(request, limits.max_body_bytes), body_timeout)
    except asyncio.TimeoutError:
        raise Refusal(408, "Request timeout",
                      f"The request body did not arrive within {body_timeout:g} s.") from None
    except ClientDisconnect:
        raise Refusal(400, "Client disconnected",
                      "The client closed the connection before the body arrived.") from None
    if body is None:
        raise Refusal(413, "Payload too large",
                      f"The request body exceeds {limits.max_body_bytes} bytes.")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Refusal(400, "Invalid JSON", "The request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise Refusal(400, "Invalid request", "The request body must be a JSON object.")
    if set(payload) - {"text", "tools"}:
        raise Refusal(400, "Invalid request",
                      "The body has fields other than 'text' and 'tools'; send only those.")
    text = payload.get("text")
    if not isinstance(text, str):
        raise Refusal(400, "Invalid field 'text'",
                      "Field 'text' is required and must be a string.")
    if not text.strip():
        raise Refusal(400, "Invalid field 'text'", "Field 'text' must not be empty.")
    if len(text) > limits.max_text_chars:
        raise Refusal(400, "Invalid field 'text'",
                      f"Field 'text' exceeds {limits.max_text_chars} characters.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Refusal(400, "Invalid field 'text'",
                      "Field 'text' contains an unpaired surrogate; send valid Unicode.") from None
    tools = payload.get("tools")
    if tools is None:
        return text, None
    if not isinstance(tools, list):
        raise Refusal(400, "Invalid field 'tools'", "Field 'tools' must be a JSON array.")
    if len(tools) > limits.max_tools:
        raise Refusal(400, "Invalid field 'tools'",
                      f"Field 'tools' has more than {limits.max_tools} tools.")
    for index, tool in enumerate(tools):
        size = len(json.dumps(tool, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        if size > limits.max_tool_bytes:
            raise Refusal(400, f"Invalid field 'tools[{index}]'",
                          f"Field 'tools[{index}]' exceeds {limits.max_tool_bytes} bytes.")
    try:
        parsed = parse_tools(tools)
    except ToolSpecError as exc:
        field = str(exc).split(" ", 1)[0]
        raise Refusal(400, f"Invalid field '{field}'", f"{exc}.") from None
    return text, parsed or None


def _answer_body(reply: TeacherReply, request_id: str, model_version: str) -> dict[str, Any]:
    """Keep only the answer the backend chose, with the request id, version and terms."""
    body: dict[str, Any] = {}
    if reply.label is not None:
        body["label"] = reply.label
    elif reply.tool_call is not None:
        body["tool_call"] = {"name": reply.tool_call["name"],
                             "arguments": reply.tool_call["arguments"]}
    else:
        body["text"] = reply.text
    body.update(request_id=request_id, model_version=model_version, notice=TERMS_NOTICE)
    return body


async def _read_body(request: Request, limit: int) -> bytes | None:
    """Read the body, stopping early; None when it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
