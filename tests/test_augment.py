"""Word-level variants of training queries (export.augment) and their build key."""

from __future__ import annotations

import random

import pytest

from edge_runtime.errors import ConfigError
from export.augment import augment_texts, perturb
from export.config import parse_config
from export.dataset import normalize_text

QUERIES = [
    "what is my checking account balance",
    "set an alarm for seven in the morning",
    "how do i say thank you in french",
    "book a table for two at an italian restaurant tonight",
    "play some jazz",
]


def test_perturb_leaves_its_input_unchanged():
    words = QUERIES[0].split()
    original = list(words)
    perturb(words, ["x", "y"], random.Random(0), edit_rate=0.5, span_rate=1.0)
    assert words == original


def test_perturb_without_edits_unchanged():
    words = QUERIES[1].split()
    assert perturb(words, ["x"], random.Random(3), edit_rate=0.0, span_rate=0.0) == words


def test_perturb_replaces_from_vocabulary():
    words = QUERIES[3].split()
    vocabulary = ["zebra", "quartz"]
    rng = random.Random(7)
    for _ in range(50):
        variant = perturb(words, vocabulary, rng, edit_rate=0.3, span_rate=0.0)
        assert set(variant) <= set(words) | set(vocabulary)
        assert len(variant) <= len(words)


def test_perturb_span_keeps_consecutive_words():
    words = QUERIES[3].split()
    rng = random.Random(11)
    for _ in range(50):
        variant = perturb(words, ["unused"], rng, edit_rate=0.0, span_rate=1.0)
        assert len(variant) >= 2
        assert len(variant) < len(words)
        start = words.index(variant[0])
        assert words[start:start + len(variant)] == variant


def test_augment_copies_upper_bound():
    variants = augment_texts(QUERIES, copies=3, seed=0)
    assert len(variants) <= 3 * len(QUERIES)
    assert len(variants) >= 2 * len(QUERIES)


def test_augment_skips_seen_texts():
    held_out = ["play some", "play jazz", "some jazz"]
    variants = augment_texts(QUERIES, copies=5, seed=1, held_out=held_out)
    keys = [normalize_text(v) for v in variants]
    assert len(keys) == len(set(keys))
    assert not set(keys) & {normalize_text(t) for t in QUERIES}
    assert not set(keys) & {normalize_text(t) for t in held_out}


def test_augment_is_reproducible_per_seed():
    first = augment_texts(QUERIES, copies=2, seed=5)
    assert augment_texts(QUERIES, copies=2, seed=5) == first
    assert augment_texts(QUERIES, copies=2, seed=6) != first


def test_augment_zero_copies_gives_nothing():
    assert augment_texts(QUERIES, copies=0, seed=0) == []


def test_augment_of_one_word_queries_stops():
    # A one-word query has few distinct variants, so the bounded tries must end the loop.
    variants = augment_texts(["hi", "hello"], copies=20, seed=0)
    assert len(variants) <= 40
    assert all(v.strip() for v in variants)


def test_augment_copies_key_is_read():
    config = parse_config({"data": {"path": "data"}, "student": {"augment_copies": 2}})
    assert config.student.augment_copies == 2


@pytest.mark.parametrize("copies", [-1, 21])
def test_augment_copies_out_of_range_rejected(copies):
    with pytest.raises(ConfigError, match="'student.augment_copies'"):
        parse_config({"data": {"path": "data"}, "student": {"augment_copies": copies}})
