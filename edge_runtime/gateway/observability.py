"""Metrics in the Prometheus text format, and JSON log lines that carry request ids.

Each gateway application owns one ``GatewayMetrics`` with its own registry, so that tests can
build several applications in one process. The counters for the extraction defences exist
from the start at zero, so dashboards and alerts can be written before those defences ship.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds. A local ONNX teacher replies within a few milliseconds, a generative one within
# seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)
DEFENCES = ("degraded", "blocked", "randomized", "watermarked", "decoy_offered",
            "decoy_chosen", "canary")


class GatewayMetrics:
    """The gateway's counters and histograms, exported by ``render``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "edge_gateway_requests", "Requests answered, by route and status code.",
            ("route", "status"), registry=self.registry)
        self.latency = Histogram(
            "edge_gateway_request_duration_seconds",
            "Time from the request's arrival to its response, by route.",
            ("route",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.rate_limited = Counter(
            "edge_gateway_rate_limited", "Requests refused by a rate limit, by policy.",
            ("policy",), registry=self.registry)
        self.limiter_errors = Counter(
            "edge_gateway_rate_limiter_errors",
            "Rate limiter backend failures, by what the gateway then did (open or closed).",
            ("action",), registry=self.registry)
        self.auth_failures = Counter(
            "edge_gateway_auth_failures", "Requests without a valid API key, by reason.",
            ("reason",), registry=self.registry)
        self.invalid_requests = Counter(
            "edge_gateway_invalid_requests", "Requests refused for their content, by status.",
            ("status",), registry=self.registry)
        self.backend_errors = Counter(
            "edge_gateway_backend_errors", "Teacher backend failures, by kind.",
            ("kind",), registry=self.registry)
        self.defence_actions = Counter(
            "edge_gateway_defence_actions",
            "Actions of the extraction defences, by action.",
            ("action",), registry=self.registry)
        self.backend_up = Gauge(
            "edge_gateway_backend_up", "1 when the last health check reached the teacher.",
            registry=self.registry)
        for action in DEFENCES:
            self.defence_actions.labels(action=action)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's extra fields.

    Pass context with ``extra={"request_id": ..., "key_id": ...}``. API keys are never passed;
    the gateway logs the key's public id instead.
    """

    # Attributes that every LogRecord has; anything else came in through ``extra``.
    _STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
        "message", "asctime", "taskName"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Send the gateway's logs to stderr as JSON lines (``"json"``) or plain text."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
