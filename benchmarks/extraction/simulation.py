"""The gateway under one defence setting, and its clients on a simulated clock.

The gateway is the real Starlette application from ``create_app`` with the real rate limiter
(and the degrade limit it applies), monitor, randomizer, watermark and decoy orchestrator,
driven in this process through ``httpx.ASGITransport``. Only the teacher's inference is done
ahead of time: ``PrecomputedTeacher`` returns the ranked candidates that the teacher package
computed in one batch, exactly as ``OnnxTeacherBackend`` ranks them.

The rate limiter, the monitor and the state store read one ``SimulatedClock``. A discrete
event loop sends one request at a time, always for the client whose next send time is the
earliest, and sets the clock to that time first. So waiting for the rate limiter costs no
real time, and the simulated time at which an attacker's last query is answered is the
wall-clock time it would need against a real gateway, serving latency left out.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from edge_runtime.gateway.app import create_app
from edge_runtime.gateway.backends import TeacherBackend, TeacherReply
from edge_runtime.gateway.config import GatewayConfig, parse_gateway_config
from edge_runtime.gateway.decoys import DecoyFactory
from edge_runtime.gateway.defences import Defences
from edge_runtime.gateway.keys import hash_api_key
from edge_runtime.gateway.monitor import (
    AuditLog,
    ClientMonitor,
    ReferenceSet,
    TextFeaturizer,
    client_key,
)
from edge_runtime.gateway.observability import GatewayMetrics
from edge_runtime.gateway.orchestrator import IntentToolRouter, Orchestrator
from edge_runtime.gateway.randomize import KeyedRandomizer
from edge_runtime.gateway.ratelimit import MemoryRateLimiter
from edge_runtime.gateway.state import MemoryStateStore
from edge_runtime.gateway.watermark import MAX_RATE, Watermark, WatermarkLedger

SETTINGS = ("off", "rate-limit", "monitor", "randomize", "watermark", "decoys",
            "degrade-limit", "all")
# Decoys reach only degraded clients, so the decoys setting includes the monitor. The degrade
# limit needs the rate limiter and the monitor; "escalation" blocks a client that keeps it
# exhausted for degrade_block_after requests in a row.
SETTING_PARTS = {
    "off": frozenset(),
    "rate-limit": frozenset({"rate-limit"}),
    "monitor": frozenset({"monitor"}),
    "randomize": frozenset({"randomize"}),
    "watermark": frozenset({"watermark"}),
    "decoys": frozenset({"monitor", "decoys"}),
    "degrade-limit": frozenset({"rate-limit", "monitor"}),
    "all": frozenset({"rate-limit", "monitor", "randomize", "watermark", "decoys",
                      "escalation"}),
}
TENANT = "benchmark"


class SimulatedClock:
    """Seconds since the start of the simulation, set by the event loop."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class PrecomputedTeacher(TeacherBackend):
    """A teacher backend that returns candidates computed ahead of time, keyed by query text."""

    name = "precomputed"

    def __init__(self, candidates: Mapping[str, tuple], model: str):
        self.candidates = candidates
        self.model = model

    async def predict(self, text, tools, request_id) -> TeacherReply:
        # Every query a client sends was ranked ahead of time, so a KeyError is a bug here.
        ranked = self.candidates[text]
        return TeacherReply(label=ranked[0][0], tool_call=None, text=None, model=self.model,
                            candidates=ranked)

    async def health(self) -> dict:
        return {"status": "ok", "model": self.model}


@dataclass
class Gateway:
    """The application of one setting and the parts the benchmark inspects afterwards."""

    app: object
    monitor: ClientMonitor | None
    ledger: WatermarkLedger | None


def gateway_config(clients: Sequence[str], key_rate: float, key_burst: int,
                   address_rate: float, address_burst: int,
                   degrade: Mapping[str, Any] | None = None) -> GatewayConfig:
    """Build a config with one API key per client id, derived from the id by ``api_key``.

    ``degrade`` sets ``[defences]`` keys such as ``degrade_rate``; the benchmark assembles
    the defences itself, so ``[defences]`` stays disabled.
    """
    raw = {
        "tiers": {"default": {"rate": key_rate, "burst": key_burst}},
        "keys": [{"id": client, "hash": hash_api_key(api_key(client)), "tenant": TENANT,
                  "tier": "default"} for client in clients],
        "rate_limit": {"per_address": {"rate": address_rate, "burst": address_burst}},
        "defences": dict(degrade or {}),
    }
    return parse_gateway_config(raw, source="benchmarks/extraction", environ={})


def api_key(client: str) -> str:
    return f"benchmark-key-{client}"


def build_gateway(setting: str, config: GatewayConfig, teacher: PrecomputedTeacher,
                  labels: Sequence[str], reference: ReferenceSet, featurizer: TextFeaturizer,
                  clock: SimulatedClock, secrets: Mapping[str, bytes], audit_path: Path
                  ) -> Gateway:
    """Assemble the application of one defence setting, as ``build_defences`` would."""
    parts = SETTING_PARTS[setting]
    limiter = MemoryRateLimiter(clock=clock) if "rate-limit" in parts else None
    metrics = GatewayMetrics()
    defence_parts = parts - {"rate-limit"}
    if not defence_parts:
        app = create_app(config, teacher, limiter, teacher.model, metrics=metrics)
        return Gateway(app, None, None)

    store = MemoryStateStore(clock=clock)
    monitor = ledger = randomizer = watermark = orchestrator = None
    settings = config.defences
    if "monitor" in defence_parts:
        monitor = ClientMonitor(store, featurizer, reference, audit=AuditLog(audit_path),
                                clock=clock)
    if "randomize" in defence_parts:
        randomizer = KeyedRandomizer(secrets["randomizer"])
    if "watermark" in defence_parts:
        watermark = Watermark(secrets["watermark"], rate=MAX_RATE)
        ledger = WatermarkLedger(store, max_marked=100_000, max_controls=100_000, clock=clock)
    if "decoys" in defence_parts:
        # The simulated clock starts at 0, so every run stays in the first decoy period.
        factory = DecoyFactory(secrets["decoys"], settings.decoy_rotation_seconds,
                               known_tenants=[TENANT])
        orchestrator = Orchestrator(
            factory, {"allow": settings.decoy_strategy_allow,
                      "degrade": settings.decoy_strategy_degrade},
            settings.decoys_per_request, router=IntentToolRouter(labels), clock=clock)
    block_after = settings.degrade_block_after if "escalation" in defence_parts else 0
    defences = Defences(monitor, store, metrics, fail_open=False, randomizer=randomizer,
                        watermark=watermark, ledger=ledger, labels=labels,
                        orchestrator=orchestrator, degrade_block_after=block_after)
    app = create_app(config, teacher, limiter, teacher.model, metrics=metrics,
                     defences=defences)
    return Gateway(app, monitor, ledger)


@dataclass
class Client:
    """The traffic of one API key: its queries, its pacing and the answers it received.

    ``interval`` is the spacing in simulated seconds between queries while no limit applies.
    ``tools``, when set, returns the OpenAI tool list sent with the query at a position.
    ``answers`` holds the label of a label answer or the tool name of a tool call, and
    ``decoys`` whether that tool call named a tool the client did not send, which only a
    decoy can be.
    """

    name: str
    address: str
    queries: list[str]
    interval: float
    budget: int
    tools: Callable[[int], list[dict]] | None = None
    answers: list[str] = field(default_factory=list)
    tool_calls: list[bool] = field(default_factory=list)  # per answer: a tool call or not
    decoys: list[bool] = field(default_factory=list)  # per answer: a call to a decoy
    answered_at: list[float] = field(default_factory=list)
    rejected_429: int = 0
    blocked_after: int | None = None  # answered queries before the first 403
    degraded_after: int | None = None  # answered queries when the tier left "allow"
    block_tier_after: int | None = None  # answered queries when the tier became "block"
    max_risk: float | None = None  # highest monitor risk after any of its queries

    @property
    def client_id(self) -> str:
        return f"key:{self.name}"


def next_send_delay(response: httpx.Response, interval: float) -> float:
    """Return the wait before the next query, read from the rate limit headers of a 200.

    When a policy reports no remaining quota, the client waits one emission interval of that
    policy, window / quota from ``RateLimit-Policy``, so it sends at the sustained rate.
    """
    limits = response.headers.get("RateLimit")
    policies = response.headers.get("RateLimit-Policy")
    if not limits or not policies:
        return interval
    delay = interval
    for limit, policy in zip(limits.split(","), policies.split(","), strict=True):
        remaining = int(_parameter(limit, "r"))
        if remaining == 0:
            quota = float(_parameter(policy, "q"))
            window = float(_parameter(policy, "w"))
            delay = max(delay, window / quota)
    return delay


def _parameter(member: str, name: str) -> str:
    for item in member.split(";")[1:]:
        key, _, value = item.strip().partition("=")
        if key == name:
            return value
    raise ValueError(f"rate limit header member {member!r} has no parameter {name!r}")


async def run_clients(gateway: Gateway, clock: SimulatedClock, clients: Sequence[Client],
                      max_attempts_factor: int = 50) -> None:
    """Send every client's queries until its budget is answered, it is blocked, or it runs
    out of queries.

    A client makes at most ``max_attempts_factor`` times its budget in attempts, so that a
    loop of rejections ends."""
    sessions = {
        client.name: httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway.app, client=(client.address, 40000)),
            base_url="http://gateway.test",
            headers={"Authorization": f"Bearer {api_key(client.name)}"})
        for client in clients
    }
    attempts = dict.fromkeys(sessions, 0)
    next_query = dict.fromkeys(sessions, 0)
    events = [(0.0, order, client) for order, client in enumerate(clients)]
    heapq.heapify(events)
    try:
        while events:
            send_at, order, client = heapq.heappop(events)
            clock.now = max(clock.now, send_at)
            position = next_query[client.name]
            if (len(client.answers) >= client.budget or position >= len(client.queries)
                    or attempts[client.name] >= max_attempts_factor * client.budget):
                continue
            attempts[client.name] += 1
            body: dict[str, Any] = {"text": client.queries[position]}
            if client.tools is not None:
                body["tools"] = client.tools(position)
            response = await sessions[client.name].post("/v1/predict", json=body)
            if response.status_code == 200:
                record_answer(client, response.json(), body.get("tools"))
                client.answered_at.append(clock.now)
                next_query[client.name] = position + 1
                delay = next_send_delay(response, client.interval)
            elif response.status_code == 429:
                client.rejected_429 += 1
                delay = float(response.headers["Retry-After"])
            elif response.status_code == 403:
                client.blocked_after = len(client.answers)
                continue
            else:
                raise RuntimeError(f"client {client.name}: unexpected status "
                                   f"{response.status_code}: {response.text[:200]}")
            await note_tier(gateway, client)
            heapq.heappush(events, (clock.now + delay, order, client))
    finally:
        for session in sessions.values():
            await session.aclose()


def record_answer(client: Client, answer: Mapping[str, Any], tools: list[dict] | None) -> None:
    """Append a label answer, or the name of a tool call and whether it named a decoy."""
    if "tool_call" in answer:
        name = answer["tool_call"]["name"]
        sent = {tool["function"]["name"] for tool in tools or ()}
        client.answers.append(name)
        client.tool_calls.append(True)
        client.decoys.append(name not in sent)
    else:
        client.answers.append(answer["label"])
        client.tool_calls.append(False)
        client.decoys.append(False)


async def note_tier(gateway: Gateway, client: Client) -> None:
    """Record after how many answered queries the monitor first degraded or blocked a client."""
    if gateway.monitor is None:
        return
    # The state value is the monitor's JSON record of the client, with its tier and last risk.
    raw_state = await gateway.monitor.store.get(client_key(client.client_id) + ":state")
    if raw_state is None:
        return
    state = json.loads(raw_state)
    tier = state["tier"]
    client.max_risk = max(client.max_risk or 0.0, float(state["risk"]))
    if tier != "allow" and client.degraded_after is None:
        client.degraded_after = len(client.answers)
    if tier == "block" and client.block_tier_after is None:
        client.block_tier_after = len(client.answers)
