"""The keyed defences as the gateway applies them to teacher replies."""

from __future__ import annotations

import asyncio

from edge_runtime.data import load_split
from edge_runtime.gateway.backends import TeacherReply
from edge_runtime.gateway.defences import Defences
from edge_runtime.gateway.observability import GatewayMetrics
from edge_runtime.gateway.randomize import KeyedRandomizer, normalize_query
from edge_runtime.gateway.state import MemoryStateStore
from edge_runtime.gateway.watermark import Watermark, WatermarkLedger
from tests.conftest import CLINC150_DIR

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
