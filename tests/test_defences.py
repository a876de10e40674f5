"""The defences as the gateway applies them: keyed changes to teacher replies, and the rate
limit of degraded clients through the real application."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_runtime.data import load_split
from edge_runtime.gateway.app import create_app
from edge_runtime.gateway.backends import OnnxTeacherBackend, TeacherReply
from edge_runtime.gateway.config import parse_gateway_config
from edge_runtime.gateway.defences import Defences
from edge_runtime.gateway.keys import hash_api_key
from edge_runtime.gateway.monitor import (
    AuditLog,
    ClientMonitor,
    MonitorConfig,
    ReferenceSet,
    TextFeaturizer,
)
from edge_runtime.gateway.observability import GatewayMetrics
from edge_runtime.gateway.randomize import KeyedRandomizer, normalize_query
from edge_runtime.gateway.ratelimit import MemoryRateLimiter
from edge_runtime.gateway.state import MemoryStateStore
from edge_runtime.gateway.watermark import Watermark, WatermarkLedger
from edge_runtime.model import OnnxClassifier
from tests.conftest import CLINC150_DIR, ROOT, demo_trust

SECRET = bytes(range(32))
LABELS = ("alarm", "timer", "weather", "balance")
NEAR_TIE = (("alarm", 0.50), ("timer", 0.45), ("weather", 0.05))
CLEAR = (("alarm", 0.90), ("timer", 0.06), ("weather", 0.04))


def make_defences() -> tuple[Defences, Watermark, WatermarkLedger, GatewayMetrics]:
    store = MemoryStateStore()
    watermark = Watermark(SECRET, rate=0.005)
    ledger = WatermarkLedger(store)
    metrics = GatewayMetrics()
    defences = Defences(None, store, metrics, fail_open=False,
                        randomizer=KeyedRandomizer(SECRET), watermark=watermark, ledger=ledger,
                        labels=LABELS)
    return defences, watermark, ledger, metrics


def reply_with(candidates) -> TeacherReply:
    return TeacherReply(label=candidates[0][0], tool_call=None, text=None, model="m",
                        candidates=candidates)


def counter(metrics: GatewayMetrics, action: str) -> float:
    return metrics.defence_actions.labels(action=action)._value.get()


def test_answers_follow_ties_and_watermark():
    defences, watermark, ledger, metrics = make_defences()
    texts = list(dict.fromkeys(example.text for example in load_split(CLINC150_DIR, "test")))
    marked = [text for text in texts if watermark.is_marked(normalize_query(text))]

    async def answer_all():
        tied = [await defences.answer("key:c", text, reply_with(NEAR_TIE), "allow", "r")
                for text in texts]
        clear = [await defences.answer("key:d", text, reply_with(CLEAR), "allow", "r")
                 for text in texts]
        return tied, clear, await ledger.entries("key:c")

    tied, clear, entries = asyncio.run(answer_all())
    tied_labels = dict(zip(texts, (reply.label for reply in tied), strict=True))
    clear_labels = dict(zip(texts, (reply.label for reply in clear), strict=True))
    unmarked = [text for text in texts if text not in set(marked)]

    # Near ties split between the top two; clear answers stay the top-1 unless marked.
    assert {tied_labels[text] for text in unmarked} == {"alarm", "timer"}
    assert {clear_labels[text] for text in unmarked} == {"alarm"}
    # About 0.5% of the 5,500 queries are marked, and each gets a label other than the top-1.
    assert 10 <= len(marked) <= 50
    assert all(clear_labels[text] != "alarm" for text in marked)
    assert sum(entry.marked for entry in entries) == len(marked)
    assert counter(metrics, "watermarked") == 2 * len(marked)
    assert counter(metrics, "randomized") > 0


def test_tool_calls_and_replies_without_candidates_pass():
    defences, *_ = make_defences()
    tool_reply = TeacherReply(label=None, tool_call={"name": "set_alarm", "arguments": {}},
                              text=None, model="m")
    plain = TeacherReply(label="alarm", tool_call=None, text=None, model="m")

    async def answer_both():
        return (await defences.answer("key:c", "wake me at 7", tool_reply, "allow", "r"),
                await defences.answer("key:c", "wake me at 7", plain, "allow", "r"))

    assert asyncio.run(answer_both()) == (tool_reply, plain)


def test_degraded_tier_randomizes_more():
    defences, *_ = make_defences()
    wide = (("alarm", 0.60), ("timer", 0.35), ("weather", 0.05))  # a margin of 0.25
    texts = [example.text for example in load_split(CLINC150_DIR, "val")[:400]]

    async def answers(tier):
        return [(await defences.answer("key:e", text, reply_with(wide), tier, "r")).label
                for text in texts]

    allowed = asyncio.run(answers("allow"))
    degraded = asyncio.run(answers("degrade"))

    assert allowed.count("timer") <= 5  # only marked queries leave the top-1
    assert degraded.count("timer") > 100


# The degrade limit, through the real application


TEACHER_PACKAGE = ROOT / "models" / "clinc150-teacher.edgepkg"
REPEATED_QUERY = "what is the balance of my checking account"
HIGH_LIMIT = {"rate": 1000.0, "burst": 1000}
# Degrade early and never block by risk, so that only the degrade limit acts. The noisy-or of
# weights below 1 never reaches a risk of 1.0.
EARLY_DEGRADE = MonitorConfig(min_queries=8, block_enter=1.0, block_exit=0.95)


class ManualClock:
    """Seconds that only the test moves, so that no limit refills between requests."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class DefendedGateway:
    """The application with a real limiter, monitor and teacher, and the parts tests read."""

    app: object
    monitor: ClientMonitor
    metrics: GatewayMetrics
    clock: ManualClock
    audit_path: Path


@pytest.fixture(scope="module")
def reference_set() -> ReferenceSet:
    train = load_split(CLINC150_DIR, "train")
    held_out = [example.text for example in load_split(CLINC150_DIR, "val")]
    return ReferenceSet.build(TextFeaturizer(), [example.text for example in train],
                              [example.label for example in train], held_out)


@pytest.fixture(scope="module")
def onnx_teacher() -> OnnxTeacherBackend:
    if not TEACHER_PACKAGE.is_file():
        pytest.skip(f"teacher package {TEACHER_PACKAGE} not found")
    return OnnxTeacherBackend(OnnxClassifier.from_file(TEACHER_PACKAGE, trust=demo_trust()))


def defended_gateway(tmp_path: Path, reference: ReferenceSet, teacher: OnnxTeacherBackend,
                     degrade: dict) -> DefendedGateway:
    clients = ("repeater", "device")
    raw = {
        "rate_limit": {"per_address": HIGH_LIMIT},
        "defences": degrade,
        "tiers": {"high": HIGH_LIMIT},
        "keys": [{"id": name, "hash": hash_api_key(api_key(name)), "tenant": "tests",
                  "tier": "high"} for name in clients],
    }
    config = parse_gateway_config(raw, source="test", environ={})
    clock = ManualClock()
    store = MemoryStateStore(clock=clock)
    audit_path = tmp_path / "audit.jsonl"
    monitor = ClientMonitor(store, TextFeaturizer(), reference, config=EARLY_DEGRADE,
                            audit=AuditLog(audit_path), clock=clock)
    metrics = GatewayMetrics()
    defences = Defences(monitor, store, metrics, fail_open=False,
                        degrade_block_after=config.defences.degrade_block_after)
    app = create_app(config, teacher, MemoryRateLimiter(clock=clock), teacher.model,
                     metrics=metrics, defences=defences)
    return DefendedGateway(app, monitor, metrics, clock, audit_path)


def api_key(client: str) -> str:
    return f"egw_test-key-of-{client}"


async def send_queries(gateway: DefendedGateway, client: str, texts: list[str],
                       seconds_between: float = 0.0) -> tuple[list[httpx.Response], list[str]]:
    """Send each text in turn, and return the responses and the client's tier after each."""
    transport = httpx.ASGITransport(app=gateway.app, client=(f"10.0.0.{len(client)}", 4000))
    responses, tiers = [], []
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test",
                                 headers={"Authorization": f"Bearer {api_key(client)}"}) as http:
        for text in texts:
            responses.append(await http.post("/v1/predict", json={"text": text}))
            tiers.append(await gateway.monitor.tier(f"key:{client}"))
            gateway.clock.now += seconds_between
    return responses, tiers


def test_degraded_client_slowed_after_burst(tmp_path, reference_set, onnx_teacher):
    gateway = defended_gateway(tmp_path, reference_set, onnx_teacher,
                               {"degrade_rate": 1.0, "degrade_burst": 3,
                                "degrade_block_after": 0})
    honest_texts = [example.text for example in load_split(CLINC150_DIR, "test")[:1200:40]]

    async def both_clients():
        repeated = await send_queries(gateway, "repeater", [REPEATED_QUERY] * 30)
        honest = await send_queries(gateway, "device", honest_texts)
        return repeated, honest

    (repeated, repeater_tiers), (honest, device_tiers) = asyncio.run(both_clients())
    degraded_at = repeater_tiers.index("degrade") + 1  # requests answered before the limit
    statuses = [response.status_code for response in repeated]
    refused = repeated[degraded_at + 3]
    samples = metric_samples(gateway.metrics)

    assert 8 <= degraded_at < 20
    assert "block" not in repeater_tiers
    assert statuses[:degraded_at + 3] == [200] * (degraded_at + 3)
    assert statuses[degraded_at + 3:] == [429] * (30 - degraded_at - 3)
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert "degraded rate limit" in refused.json()["detail"]
    assert float(refused.headers["Retry-After"]) >= 1
    assert '"degraded";q=3;w=3' in refused.headers["RateLimit-Policy"]
    assert '"degraded";r=0' in refused.headers["RateLimit"]
    # Before the tier changed, the degrade limit was not applied at all.
    assert "degraded" not in repeated[degraded_at - 1].headers["RateLimit-Policy"]
    assert '"degraded";r=2' in repeated[degraded_at].headers["RateLimit"]

    assert set(device_tiers) == {"allow"}
    assert [response.status_code for response in honest] == [200] * len(honest_texts)
    assert all("degraded" not in response.headers["RateLimit-Policy"] for response in honest)
    slowed = 30 - degraded_at - 3
    assert samples[("edge_gateway_defence_actions_total", "slowed")] == slowed
    assert samples[("edge_gateway_rate_limited_total", "degraded")] == slowed
    assert samples[("edge_gateway_defence_actions_total", "escalated")] == 0


def test_exhausted_degrade_limit_blocks(tmp_path, reference_set, onnx_teacher):
    gateway = defended_gateway(tmp_path, reference_set, onnx_teacher,
                               {"degrade_rate": 1.0, "degrade_burst": 2,
                                "degrade_block_after": 4})

    responses, tiers = asyncio.run(send_queries(gateway, "repeater", [REPEATED_QUERY] * 30))
    degraded_at = tiers.index("degrade") + 1
    statuses = [response.status_code for response in responses]
    events = AuditLog.read(gateway.audit_path)
    samples = metric_samples(gateway.metrics)

    # After the tier change: one request with quota left, one that empties the limit, three
    # refused; the fourth exhausted request blocks the client.
    after = statuses[degraded_at:]
    assert after[:5] == [200, 200, 429, 429, 429]
    assert set(after[5:]) == {403}
    assert tiers[degraded_at + 4] == "block"
    assert [event["new_tier"] for event in events] == ["degrade", "block"]
    assert events[-1]["reason"] == "flag: degrade limit exhausted on 4 requests in a row"
    assert samples[("edge_gateway_defence_actions_total", "escalated")] == 1
    assert samples[("edge_gateway_defence_actions_total", "slowed")] == 3


def test_degraded_client_below_limit_never_blocked(tmp_path, reference_set, onnx_teacher):
    gateway = defended_gateway(tmp_path, reference_set, onnx_teacher,
                               {"degrade_rate": 1.0, "degrade_burst": 2,
                                "degrade_block_after": 4})

    # One request every 2 s against a limit of 1 per second finds quota left every time.
    responses, tiers = asyncio.run(send_queries(gateway, "repeater", [REPEATED_QUERY] * 40,
                                                seconds_between=2.0))
    degraded_at = tiers.index("degrade") + 1

    assert degraded_at < 20
    assert [response.status_code for response in responses] == [200] * 40
    assert set(tiers[degraded_at - 1:]) == {"degrade"}
    assert all('"degraded";r=1' in response.headers["RateLimit"]
               for response in responses[degraded_at:])


def metric_samples(metrics: GatewayMetrics) -> dict[tuple[str, str], float]:
    """Return the counters by name and their one label's value, as /metrics exports them."""
    samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name.endswith("_total") and len(sample.labels) == 1:
                samples[(sample.name, next(iter(sample.labels.values())))] = sample.value
    return samples
