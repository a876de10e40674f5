"""The teacher gateway's HTTP application (Starlette).

Endpoints:

- ``POST /v1/predict`` with ``{"text": "..."}`` returns ``{"label", "request_id",
  "model_version", "notice"}``: the top-1 label only, never scores or rankings.
- ``GET /healthz`` returns ``{"status": "ok"}`` once the teacher is loaded.

Every error is an RFC 9457 problem body (``application/problem+json``) with fixed text that does
not echo the request; an unexpected exception is logged with its request id and returns 500
without a stack trace.
"""

from __future__ import annotations

import json
import logging
import uuid

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edge_runtime.model import OnnxClassifier

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # bytes
MAX_TEXT_CHARS = 2_000
TERMS_NOTICE = (
    "Outputs of this service may not be used to train, distil or evaluate other models."
)


def problem(status: int, title: str, detail: str, request_id: str) -> JSONResponse:
    body = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "request_id": request_id,
    }
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def create_app(teacher: OnnxClassifier) -> Starlette:
    """Build the gateway application around a loaded teacher classifier."""
    model_version = f"{teacher.package.manifest.name}@{teacher.package.manifest.version}"

    async def predict(request: Request) -> Response:
        request_id = uuid.uuid4().hex
        body = await _read_body(request)
        if body is None:
            return problem(413, "Payload too large",
                           f"The request body exceeds {MAX_BODY_BYTES} bytes.", request_id)
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return problem(400, "Invalid JSON", "The request body is not valid JSON.", request_id)
        if not isinstance(payload, dict):
            return problem(400, "Invalid request",
                           "The request body must be a JSON object.", request_id)
        text = payload.get("text")
        if not isinstance(text, str):
            return problem(400, "Invalid field 'text'",
                           "Field 'text' is required and must be a string.", request_id)
        if not text.strip():
            return problem(400, "Invalid field 'text'",
                           "Field 'text' must not be empty.", request_id)
        if len(text) > MAX_TEXT_CHARS:
            return problem(400, "Invalid field 'text'",
                           f"Field 'text' exceeds {MAX_TEXT_CHARS} characters.", request_id)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return problem(400, "Invalid field 'text'",
                           "Field 'text' contains an unpaired surrogate; send valid Unicode.",
                           request_id)

        prediction = await run_in_threadpool(teacher.predict, text)
        label = teacher.labels[int(prediction.logits.argmax())]
        log.info("predict request_id=%s chars=%d ms=%.2f", request_id, len(text),
                 prediction.tokenize_ms + prediction.inference_ms)
        return JSONResponse(
            {
                "label": label,
                "request_id": request_id,
                "model_version": model_version,
                "notice": TERMS_NOTICE,
            },
            headers={"X-Terms-Notice": TERMS_NOTICE},
        )

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model_version": model_version})

    async def not_found(request: Request, exc: Exception) -> Response:
        return problem(404, "Not found", "No such endpoint.", uuid.uuid4().hex)

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return problem(405, "Method not allowed", "This endpoint does not accept that method.",
                       uuid.uuid4().hex)

    async def server_error(request: Request, exc: Exception) -> Response:
        request_id = uuid.uuid4().hex
        log.exception("unhandled error request_id=%s", request_id)
        return problem(500, "Internal error", "The server failed to process the request.",
                       request_id)

    return Starlette(
        routes=[
            Route("/v1/predict", predict, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: method_not_allowed, Exception: server_error},
    )


async def _read_body(request: Request) -> bytes | None:
    """Read the body, stopping early; None when it exceeds MAX_BODY_BYTES."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    chunks = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
