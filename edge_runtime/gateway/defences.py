"""The extraction defences as the gateway applies them to each request.

``Defences.admit`` runs before the teacher: a client the monitor has blocked gets a 403. The
teacher's answer then goes through ``Defences.record``, which feeds the behavioural monitor.
Every tier change is counted in the metrics and written to the audit log by the monitor.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge_runtime.errors import ConfigError
from edge_runtime.gateway.backends import TeacherReply
from edge_runtime.gateway.config import GatewayConfig
from edge_runtime.gateway.monitor import (
    BLOCK,
    DEGRADE,
    AuditLog,
    ClientMonitor,
    MonitorVerdict,
    ReferenceSet,
    TextFeaturizer,
)
from edge_runtime.gateway.observability import GatewayMetrics
from edge_runtime.gateway.state import StateStore, StateUnavailable, create_state_store

log = logging.getLogger(__name__)


class ClientBlocked(Exception):
    """The monitor has blocked this client; the gateway answers 403."""


class DefenceStateUnavailable(Exception):
    """The defences' state store is down and the gateway fails closed; it answers 503."""


class Defences:
    """Apply the configured defences; ``monitor`` None turns monitoring off."""

    def __init__(self, monitor: ClientMonitor | None, store: StateStore | None,
                 metrics: GatewayMetrics, fail_open: bool):
        self.monitor = monitor
        self.store = store
        self.metrics = metrics
        self.fail_open = fail_open

    async def admit(self, client_id: str, request_id: str) -> str:
        """Return the client's tier; raise ClientBlocked for a blocked client."""
        if self.monitor is None:
            return "allow"
        try:
            tier = await self.monitor.tier(client_id)
        except StateUnavailable as exc:
            return self._state_failed(exc, request_id)
        if tier == BLOCK:
            self.metrics.defence_actions.labels(action="blocked").inc()
            raise ClientBlocked(client_id)
        return tier

    async def record(self, client_id: str, text: str, reply: TeacherReply,
                     request_id: str) -> MonitorVerdict | None:
        """Show the monitor the query and the answer it got."""
        if self.monitor is None:
            return None
        answer = reply.label if reply.label is not None else (
            reply.tool_call["name"] if reply.tool_call is not None else None)
        try:
            verdict = await self.monitor.observe(client_id, text, answer)
        except StateUnavailable as exc:
            self._state_failed(exc, request_id)
            return None
        if verdict.changed:
            log.warning("client tier changed from %s to %s", verdict.previous_tier, verdict.tier,
                        extra={"request_id": request_id, "client_id": client_id,
                               "risk": round(verdict.risk, 3)})
            if verdict.tier == DEGRADE:
                self.metrics.defence_actions.labels(action="degraded").inc()
        return verdict

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()

    def _state_failed(self, exc: StateUnavailable, request_id: str) -> str:
        action = "open" if self.fail_open else "closed"
        log.error("defence state unavailable, failing %s: %s", action, exc,
                  extra={"request_id": request_id})
        if self.fail_open:
            return "allow"
        raise DefenceStateUnavailable(str(exc))


def build_defences(config: GatewayConfig, metrics: GatewayMetrics) -> Defences | None:
    """Build the defences that ``config.defences`` turns on, or None when they are off."""
    settings = config.defences
    if not settings.enabled:
        return None
    monitor = store = None
    if settings.monitor:
        from edge_runtime.data import load_split

        folder = settings.reference_data
        try:
            train = load_split(folder, "train")
            held_out = load_split(folder, "val")
        except (FileNotFoundError, OSError) as exc:
            raise ConfigError(f"{config.source}: defences.reference_data: cannot read the "
                              f"train and val splits in {folder!r}: {exc}") from None
        featurizer = TextFeaturizer()
        reference = ReferenceSet.build(featurizer, [example.text for example in train],
                                       [example.label for example in train],
                                       [example.text for example in held_out])
        store = create_state_store(config.rate_limit.backend, config.rate_limit.redis_url)
        audit = AuditLog(Path(settings.audit_log))
        monitor = ClientMonitor(store, featurizer, reference, audit=audit)
        log.info("behavioural monitor on: reference of %d training queries, audit log %s",
                 len(train), settings.audit_log)
    return Defences(monitor, store, metrics,
                    fail_open=config.rate_limit.on_backend_error == "open")
