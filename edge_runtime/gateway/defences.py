"""The extraction defences as the gateway applies them to each request.

``Defences.admit`` runs before the teacher: a client the monitor has blocked gets a 403.
``Defences.ask`` sends a request with tools through the decoy orchestrator, and blocks a
client whose tools name a decoy. ``Defences.answer`` then breaks a near tie between the
teacher's top two labels by a keyed hash of the query, with a wider margin for degraded
clients. It also gives a keyed 0.5% of queries the watermark's alternative and records them
in the ledger with a control sample. ``Defences.record`` passes the query and the label
returned for it to the behavioural monitor. Tier changes are counted in the metrics and
written to the audit log.

A degraded client also gets the degrade rate limit, which the application enforces with its
rate limiter. ``Defences.note_degraded_request`` counts the requests that find that limit
exhausted, and blocks a client that keeps it exhausted for ``degrade_block_after`` requests
in a row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from edge_runtime.errors import ConfigError
from edge_runtime.gateway.backends import TeacherBackend, TeacherReply, ToolSpec
from edge_runtime.gateway.config import GatewayConfig
from edge_runtime.gateway.decoys import DecoyFactory
from edge_runtime.gateway.monitor import (
    BLOCK,
    DEGRADE,
    AuditLog,
    ClientMonitor,
    MonitorVerdict,
    ReferenceSet,
    TextFeaturizer,
    client_key,
)
from edge_runtime.gateway.observability import GatewayMetrics
from edge_runtime.gateway.orchestrator import IntentToolRouter, Orchestrator
from edge_runtime.gateway.randomize import KeyedRandomizer, normalize_query, secret_from_env
from edge_runtime.gateway.ratelimit import Decision
from edge_runtime.gateway.state import StateStore, StateUnavailable, create_state_store
from edge_runtime.gateway.watermark import Watermark, WatermarkLedger

log = logging.getLogger(__name__)

# Actions counted in ``edge_gateway_defence_actions_total`` besides those that
# ``observability.DEFENCES`` creates: requests refused by the degrade limit, and clients
# blocked for keeping it exhausted.
DEGRADE_LIMIT_ACTIONS = ("slowed", "escalated")
ESCALATION_REASON = "degrade limit exhausted on {count} requests in a row"


class ClientBlocked(Exception):
    """Error for a client that the monitor has blocked; the gateway returns 403."""


class DefenceStateUnavailable(Exception):
    """Error for a state store that is down while the gateway fails closed; it returns 503."""


class Defences:
    """Apply the configured defences; ``monitor`` None turns monitoring off.

    ``degrade_block_after`` is the number of requests in a row on which a degraded client
    finds its degrade limit exhausted before the monitor blocks it. 0 never blocks for that.
    """

    def __init__(self, monitor: ClientMonitor | None, store: StateStore | None,
                 metrics: GatewayMetrics, fail_open: bool,
                 randomizer: KeyedRandomizer | None = None,
                 watermark: Watermark | None = None, ledger: WatermarkLedger | None = None,
                 labels: Sequence[str] = (), orchestrator: Orchestrator | None = None,
                 degrade_block_after: int = 0):
        if degrade_block_after < 0:
            raise ConfigError(f"degrade_block_after is {degrade_block_after}; pass 0 (never "
                              "block for the degrade limit) or a number of requests")
        self.monitor = monitor
        self.store = store
        self.metrics = metrics
        self.fail_open = fail_open
        self.randomizer = randomizer
        self.watermark = watermark
        self.ledger = ledger
        self.labels = tuple(labels)
        self.orchestrator = orchestrator
        self.degrade_block_after = degrade_block_after
        for action in DEGRADE_LIMIT_ACTIONS:
            metrics.defence_actions.labels(action=action)

    async def ask(self, backend: TeacherBackend, text: str, tools: list[ToolSpec] | None,
                  client_id: str, tenant: str, tier: str, request_id: str) -> TeacherReply:
        """Ask the teacher, through the decoy orchestrator when the request carries tools.

        Raises ClientBlocked when the client's tool list names a decoy (a canary), because
        only a client that harvested an earlier reply can know a decoy's name."""
        if self.orchestrator is None or not tools:
            return await backend.predict(text, tools, request_id)
        outcome = await self.orchestrator.run(text, tools, tenant, tier, backend, request_id)
        if outcome.canaries:
            self.metrics.defence_actions.labels(action="canary").inc()
            log.warning("decoy tool names in a client's request", extra={
                "request_id": request_id, "client_id": client_id, "count": len(outcome.canaries)})
            if self.monitor is not None:
                try:
                    await self.monitor.flag(client_id, "decoy tool name in the request")
                except StateUnavailable as exc:
                    self._state_failed(exc, request_id)
            raise ClientBlocked(client_id)
        if outcome.decoy_offered:
            self.metrics.defence_actions.labels(action="decoy_offered").inc()
        if outcome.decoy_chosen is not None:
            self.metrics.defence_actions.labels(action="decoy_chosen").inc()
        return outcome.reply

    async def answer(self, client_id: str, text: str, reply: TeacherReply, tier: str,
                     request_id: str) -> TeacherReply:
        """Return the reply to send: the keyed near-tie choice, or the watermark's alternative.

        Only label answers with the teacher's candidates change; tool calls and text pass.
        """
        if reply.label is None or not reply.candidates:
            return reply
        top = reply.candidates[0][0]
        label = top
        if self.randomizer is not None:
            label = self.randomizer.choose(text, reply.candidates, tier)
            if label != top:
                self.metrics.defence_actions.labels(action="randomized").inc()
        if self.watermark is not None:
            normalized = normalize_query(text)
            try:
                if self.watermark.is_marked(normalized):
                    label = self.watermark.alternative(normalized, reply.candidates,
                                                       self.labels)
                    self.metrics.defence_actions.labels(action="watermarked").inc()
                    await self.ledger.record(client_id, normalized, label, top, True)
                elif self.watermark.is_control(normalized):
                    alternative = self.watermark.alternative(normalized, reply.candidates,
                                                             self.labels)
                    await self.ledger.record(client_id, normalized, label, top, False,
                                             alternative=alternative)
            except StateUnavailable as exc:
                self._state_failed(exc, request_id)
        return replace(reply, label=label)

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
        """Pass the query and the label or tool returned for it to the monitor."""
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

    async def note_degraded_request(self, client_id: str, decision: Decision,
                                    request_id: str) -> bool:
        """Count a degraded client's request against the degrade limit, and return True when
        this request made the monitor block the client.

        A request counts when the limit refused it or admitted it with no quota left, which
        only a client sending at the limit's rate or faster does. A request that finds quota
        left starts the count again, and so does a pause long enough to refill the limit,
        because the count expires then. At ``degrade_block_after`` the client is flagged,
        so its next request gets 403.

        NOTE: the count is read and written without a lock, so concurrent requests of one
        client, in one process or on several replicas, can lose counts and block it later.
        """
        if not decision.allowed:
            self.metrics.defence_actions.labels(action="slowed").inc()
        if self.monitor is None or self.store is None or self.degrade_block_after == 0:
            return False
        key = client_key(client_id) + ":degrade-exhausted"
        # The limit is full again after reset_after seconds. A request after that finds quota
        # left and starts the count again, so the count may expire then.
        ttl_seconds = max(decision.reset_after, 1.0)
        exhausted = not decision.allowed or decision.remaining == 0
        try:
            if not exhausted:
                await self.store.set(key, "0", ttl_seconds=ttl_seconds)
                return False
            count = int(await self.store.get(key) or 0) + 1
            await self.store.set(key, str(count), ttl_seconds=ttl_seconds)
            if count < self.degrade_block_after:
                return False
            await self.monitor.flag(client_id, ESCALATION_REASON.format(count=count))
        except StateUnavailable as exc:
            self._state_failed(exc, request_id)
            return False
        self.metrics.defence_actions.labels(action="escalated").inc()
        log.warning("client blocked for keeping the degrade limit exhausted", extra={
            "request_id": request_id, "client_id": client_id, "count": count})
        return True

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


def build_defences(config: GatewayConfig, metrics: GatewayMetrics,
                   labels: Sequence[str] = ()) -> Defences | None:
    """Build the defences that ``config.defences`` turns on, or None when they are off.

    ``labels`` is the teacher's label space, from which the watermark may pick."""
    settings = config.defences
    if not settings.enabled:
        return None
    monitor = None
    store = create_state_store(config.rate_limit.backend, config.rate_limit.redis_url)
    randomizer = watermark = ledger = orchestrator = None
    if settings.randomize or settings.watermark or settings.decoys:
        secret = secret_from_env(settings.secret_env)
        if settings.randomize:
            randomizer = KeyedRandomizer(secret)
        if settings.watermark:
            watermark = Watermark(secret, rate=settings.watermark_rate)
            ledger = WatermarkLedger(store)
        if settings.decoys:
            factory = DecoyFactory(secret, settings.decoy_rotation_seconds,
                                   known_tenants=sorted({key.tenant for key in config.keys}))
            router = IntentToolRouter(labels) if config.teacher.backend == "onnx" else None
            orchestrator = Orchestrator(
                factory, {"allow": settings.decoy_strategy_allow,
                          "degrade": settings.decoy_strategy_degrade},
                settings.decoys_per_request, router=router)
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
        audit = AuditLog(Path(settings.audit_log))
        monitor = ClientMonitor(store, featurizer, reference, audit=audit)
        log.info("behavioural monitor on: reference of %d training queries, audit log %s",
                 len(train), settings.audit_log)
        if not config.rate_limit.enabled:
            log.warning("rate limiting is off, so degraded clients get no degrade limit and "
                        "are never blocked for exhausting it")
    return Defences(monitor, store, metrics,
                    fail_open=config.rate_limit.on_backend_error == "open",
                    randomizer=randomizer, watermark=watermark, ledger=ledger, labels=labels,
                    orchestrator=orchestrator,
                    degrade_block_after=settings.degrade_block_after)
