"""The device's answer caches: exact LRU with a time to live, and the semantic cache."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge_runtime.cache import AnswerCache, SemanticCache, normalize_text
from edge_runtime.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("text", "key"), [
    ("Set a timer!", "set a timer"),
    ("  set   a\ttimer ", "set a timer"),
    ("SET A TIMER?", "set a timer"),
    ("what's the time", "what's the time"),
    ("Ｈｅｌｌｏ", "hello"),  # full-width letters fold under NFKC
])
def test_normalize_text(text: str, key: str):
    assert normalize_text(text) == key


def test_hit_after_put_for_variant_spelling():
    cache = AnswerCache()
    cache.put("Set a timer!", "timer")

    assert cache.get("set a  timer") == "timer"
    assert cache.get("set an alarm") is None
    assert cache.stats.as_dict() == {"hits": 1, "misses": 1, "expired": 0, "evicted": 0}


def test_entries_expire():
    clock = Clock()
    cache = AnswerCache(ttl=60, clock=clock)
    cache.put("what is my balance", "balance")

    clock.now += 59.9
    assert cache.get("what is my balance") == "balance"
    clock.now += 0.2
    assert cache.get("what is my balance") is None
    assert cache.stats.expired == 1
    assert len(cache) == 0


def test_least_recently_used_evicted():
    cache = AnswerCache(max_entries=2)
    cache.put("a", "1")
    cache.put("b", "2")
    assert cache.get("a") == "1"  # "b" is now the least recently used
    cache.put("c", "3")

    assert cache.get("b") is None
    assert cache.get("a") == "1"
    assert cache.get("c") == "3"
    assert cache.stats.evicted == 1


def test_put_replaces_label():
    cache = AnswerCache()
    cache.put("a", "1")
    cache.put("A", "2")

    assert cache.get("a") == "2"
    assert len(cache) == 1


@pytest.mark.parametrize(("options", "message"), [
    ({"max_entries": 0}, "max_entries"), ({"max_entries": 1.5}, "max_entries"),
    ({"ttl": 0}, "ttl"), ({"ttl": -1}, "ttl"), ({"ttl": True}, "ttl"),
])
def test_invalid_limits_rejected(options: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        AnswerCache(**options)
    with pytest.raises(ConfigError, match=message):
        SemanticCache(**options)


@pytest.mark.parametrize("threshold", [0, -0.5, 1.01, "0.9", None])
def test_invalid_threshold_rejected(threshold):
    with pytest.raises(ConfigError, match="threshold"):
        SemanticCache(threshold=threshold)


def test_threads_share_cache():
    cache = AnswerCache(max_entries=500)

    def work(offset: int) -> None:
        for index in range(200):
            cache.put(f"query {offset + index}", str(offset + index))
            cache.get(f"query {offset + index // 2}")

    threads = [threading.Thread(target=work, args=(1000 * n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(cache) == 500
    assert cache.stats.hits + cache.stats.misses == 800


def test_semantic_hit_above_threshold():
    cache = SemanticCache(threshold=0.99)
    cache.put(np.array([5.0, 1.0, 0.0]), "timer")
    cache.put(np.array([0.0, 1.0, 5.0]), "alarm")

    label, similarity = cache.get(np.array([5.0, 1.1, 0.05]))

    assert label == "timer"
    assert similarity > 0.99
    assert cache.get(np.array([3.0, 3.0, 3.0])) is None
    assert cache.stats.hits == 1
    assert cache.stats.misses == 1


def test_semantic_ignores_scale_not_direction():
    cache = SemanticCache(threshold=0.999)
    cache.put([1.0, 2.0, 3.0], "x")

    assert cache.get([2.0, 4.0, 6.0])[0] == "x"
    assert cache.get([3.0, 2.0, 1.0]) is None


def test_semantic_skips_unusable_vectors():
    cache = SemanticCache()
    cache.put([float("nan"), 1.0], "x")
    cache.put([0.0, 0.0], "y")

    assert len(cache) == 0
    assert cache.get([float("inf"), 1.0]) is None
    assert cache.get([1.0, 2.0, 3.0]) is None  # nothing stored yet


def test_semantic_ring_evicts_oldest_and_expires():
    clock = Clock()
    cache = SemanticCache(threshold=0.999, max_entries=2, ttl=100, clock=clock)
    cache.put([1.0, 0.0, 0.0], "a")
    cache.put([0.0, 1.0, 0.0], "b")
    clock.now += 50
    cache.put([0.0, 0.0, 1.0], "c")  # replaces "a"

    assert cache.get([1.0, 0.0, 0.0]) is None
    assert cache.get([0.0, 0.0, 1.0])[0] == "c"
    assert cache.stats.evicted == 1
    clock.now += 60  # "b" is 110 s old, "c" 60 s
    assert cache.get([0.0, 1.0, 0.0]) is None
    assert cache.get([0.0, 0.0, 1.0])[0] == "c"
    assert cache.stats.expired == 1


def test_semantic_dimension_change_resets():
    cache = SemanticCache(threshold=0.99)
    cache.put([1.0, 0.0], "two")

    assert cache.get([1.0, 0.0, 0.0]) is None
    cache.put([1.0, 0.0, 0.0], "three")
    assert cache.get([1.0, 0.0, 0.0])[0] == "three"
    assert len(cache) == 1
