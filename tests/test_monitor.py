"""The extraction monitor: its normality test, featurizer, signals and tiers, the audit log,
and replays of real honest and attacking clients against the bundled CLINC150 teacher."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from edge_runtime.data import load_split
from edge_runtime.errors import ConfigError
from edge_runtime.gateway.monitor import (
    ALLOW,
    BLOCK,
    DEGRADE,
    SIGNALS,
    AuditLog,
    AuditLogError,
    ClientMonitor,
    MonitorConfig,
    ReferenceSet,
    TextFeaturizer,
    Window,
    client_key,
    combine_risk,
    decode_sketch,
    encode_sketch,
    format_record,
    label_coverage,
    next_tier,
    normal_quantile,
    quantize_sketch,
    query_frame,
    record_id,
    shapiro_wilk,
)
from edge_runtime.gateway.state import MemoryStateStore, RedisStateStore
from tests.conftest import CLINC150_DIR, DATA_DIR, MODELS_DIR, ROOT, demo_trust, require_clinc150

BANKING77_DIR = DATA_DIR / "banking77"
WIKI_SENTENCES = DATA_DIR / "wiki_sentences" / "all_wiki_sents.txt"
TEACHER_PACKAGE = MODELS_DIR / "clinc150-teacher.edgepkg"
ATTACK_BUDGET = 1000  # queries within which every attacker must be flagged
LABEL_BATCH = 50

# The templated attacker fills in-domain frames with verbs and nouns from the CLINC150 domains.
TEMPLATES = ("how do i {verb} my {noun}", "can you {verb} my {noun}",
             "i need to {verb} my {noun}", "please {verb} my {noun} for me",
             "help me {verb} my {noun}")
VERBS = ("cancel", "freeze", "check", "change", "reset", "update", "pay", "report", "renew",
         "replace", "transfer", "book", "order", "unlock", "activate", "share", "find",
         "increase", "lower", "close")
NOUNS = ("card", "account", "pin", "password", "bill", "balance", "flight", "reservation",
         "car", "insurance", "credit score", "alarm", "playlist", "shopping list", "calendar",
         "reminder", "phone", "order", "rewards", "direct deposit", "credit limit", "vacation",
         "meeting", "timer")


def run(coroutine):
    return asyncio.run(coroutine)


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Teacher:
    """Top-1 labels from the bundled CLINC150 teacher, cached per text."""

    def __init__(self) -> None:
        from edge_runtime.model import OnnxClassifier

        self.classifier = OnnxClassifier.from_file(str(TEACHER_PACKAGE), trust=demo_trust())
        self.cache: dict[str, str] = {}

    def labels(self, texts: list[str]) -> list[str]:
        missing = sorted({text for text in texts if text not in self.cache}, key=len)
        for first in range(0, len(missing), 64):
            batch = missing[first:first + 64]
            logits = self.classifier.predict_batch(batch)
            for text, row in zip(batch, logits, strict=True):
                self.cache[text] = self.classifier.labels[int(row.argmax())]
        return [self.cache[text] for text in texts]


@pytest.fixture(scope="module")
def clinc():
    require_clinc150()
    return {split: load_split(CLINC150_DIR, split) for split in ("train", "val", "test")}


@pytest.fixture(scope="module")
def featurizer():
    return TextFeaturizer()


@pytest.fixture(scope="module")
def reference(clinc, featurizer):
    train = clinc["train"]
    held_out = [example.text for example in clinc["val"] if example.label != "oos"]
    return ReferenceSet.build(featurizer, [example.text for example in train],
                              [example.label for example in train], held_out)


@pytest.fixture(scope="module")
def teacher():
    if not TEACHER_PACKAGE.is_file():
        pytest.skip(f"teacher package {TEACHER_PACKAGE} not found")
    return Teacher()


@pytest.fixture(scope="module")
def honest_texts(clinc):
    """CLINC150 test queries, out-of-scope ones included, in a fixed shuffled order."""
    texts = [example.text for example in clinc["test"]]
    random.Random(11).shuffle(texts)
    return texts


def wiki_sentences() -> list[str]:
    if not WIKI_SENTENCES.is_file():
        pytest.skip(f"Wikipedia sentences not found at {WIKI_SENTENCES}")
    with open(WIKI_SENTENCES, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def banking77_texts() -> list[str]:
    if not (BANKING77_DIR / "test.csv").is_file():
        pytest.skip(f"Banking77 not found at {BANKING77_DIR}")
    return [example.text for example in load_split(BANKING77_DIR, "test")]


async def replay(monitor: ClientMonitor, client_id: str, texts: list[str],
                 labels: list[str | None]):
    return [await monitor.observe(client_id, text, label)
            for text, label in zip(texts, labels, strict=True)]


async def queries_until_flagged(monitor: ClientMonitor, client_id: str, texts: list[str],
                                teacher: Teacher) -> int | None:
    """Send ``texts`` with the teacher's labels until the client leaves allow, and return
    the number of queries sent by then (None if it stays in allow)."""
    for first in range(0, min(len(texts), ATTACK_BUDGET), LABEL_BATCH):
        batch = texts[first:first + LABEL_BATCH]
        for offset, (text, label) in enumerate(zip(batch, teacher.labels(batch), strict=True)):
            verdict = await monitor.observe(client_id, text, label)
            if verdict.tier != ALLOW:
                return first + offset + 1
    return None


# ---------------------------------------------------------------------------------------------
# Normality test


@pytest.mark.parametrize(("p", "expected"), [
    (0.5, 0.0),
    (0.975, 1.959963984540054),
    (0.95, 1.6448536269514722),
    (0.001, -3.090232306167813),
    (1e-10, -6.361340902404056),
    (0.999999, 4.753424308822899),
])
def test_normal_quantile_known_values(p, expected):
    assert normal_quantile(p) == pytest.approx(expected, rel=1e-11, abs=1e-12)


def test_normal_quantile_rejects_bounds():
    for p in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            normal_quantile(p)


# Reference values of scipy.stats.shapiro (the AS R94 algorithm): the weights in pounds of 11
# men from Shapiro and Wilk (1965), the two samples of SciPy's own test suite, and two small
# samples that exercise n = 3 (exact p-value) and n <= 5 (one corrected weight).
SHAPIRO_CASES = [
    ([148, 154, 158, 160, 161, 162, 166, 170, 182, 195, 236], 0.7888146948631716,
     0.006703814061898823),
    ([0.11, 7.87, 4.61, 10.14, 7.95, 3.14, 0.46, 4.43, 0.21, 4.75, 0.71, 1.52, 3.24, 0.93,
      0.42, 4.97, 9.53, 4.55, 0.47, 6.66], 0.90047299861907959, 0.042089745402336121),
    ([1.36, 1.14, 2.92, 2.55, 1.46, 1.06, 5.27, -1.11, 3.48, 1.10, 0.88, -0.51, 1.46, 0.52,
      6.20, 1.69, 0.08, 3.67, 2.81, 3.49], 0.9590270, 0.52460),
    ([1, 2, 10], 0.8321917808219177, 0.19391752148145214),
    ([1, 1.5, 2, 2.5, 9], 0.7135481348491046, 0.013201260921913621),
]


@pytest.mark.parametrize(("sample", "statistic", "p_value"), SHAPIRO_CASES,
                         ids=["weights-n11", "scipy-x1", "scipy-x2", "n3", "n5"])
def test_shapiro_wilk_published_values(sample, statistic, p_value):
    result = shapiro_wilk(sample)
    # SciPy's routine runs in single precision, hence the tolerances.
    assert result.statistic == pytest.approx(statistic, abs=1e-6)
    assert result.p_value == pytest.approx(p_value, abs=1e-4)


def test_shapiro_wilk_order_invariant():
    sample = [148, 154, 158, 160, 161, 162, 166, 170, 182, 195, 236]
    shuffled = sample[::-1]
    assert shapiro_wilk(shuffled) == shapiro_wilk(sample)


def test_shapiro_wilk_separates_normal_from_skewed():
    rng = np.random.default_rng(20)
    normal = shapiro_wilk(rng.standard_normal(256))
    skewed = shapiro_wilk(rng.exponential(size=256))

    assert normal.p_value > 0.05
    assert skewed.p_value < 1e-6
    assert skewed.statistic < normal.statistic


@pytest.mark.parametrize("sample", [[1.0, 2.0], [3.0] * 10, [1.0, float("nan"), 2.0],
                                    list(range(5001))],
                         ids=["too-few", "constant", "nan", "too-many"])
def test_shapiro_wilk_rejects_bad_samples(sample):
    with pytest.raises(ValueError):
        shapiro_wilk(sample)


# ---------------------------------------------------------------------------------------------
# Featurizer, frames and stored records


def test_featurizer_unit_vectors(featurizer):
    embedding, sketch = featurizer.vectors("Transfer 200 dollars to savings")

    assert embedding.dtype == np.float32
    assert embedding.shape == (1024,)
    assert sketch.shape == (96,)
    assert float(np.linalg.norm(embedding)) == pytest.approx(1.0, abs=1e-5)
    assert float(np.linalg.norm(sketch)) == pytest.approx(1.0, abs=1e-5)


def test_featurizer_empty_text_zero(featurizer):
    embedding, sketch = featurizer.vectors("   ")
    assert not embedding.any()
    assert not sketch.any()


def test_featurizer_normalises_case_whitespace(featurizer):
    first = featurizer.embed("What is my  balance")
    second = featurizer.embed("  what IS my balance ")
    assert np.array_equal(first, second)


def test_featurizer_paraphrase_closer_than_unrelated(featurizer):
    query = featurizer.embed("what is the balance on my credit card")
    paraphrase = featurizer.embed("what's my credit card balance")
    unrelated = featurizer.embed("play some jazz music in the kitchen")

    assert float(query @ paraphrase) > 0.5
    assert float(query @ unrelated) < 0.2


def test_sketch_cosines_track_embeddings(featurizer, clinc):
    # The test split lists 30 queries per intent in a row, so these pairs are often related.
    texts = [example.text for example in clinc["test"][:600]]
    embeddings = featurizer.embed_batch(texts)
    sketches = np.stack([featurizer.sketch(text) for text in texts])
    rng = np.random.default_rng(3)
    first = rng.integers(0, len(texts), size=2000)
    second = np.minimum(len(texts) - 1, first + rng.integers(1, 30, size=2000))
    full = np.sum(embeddings[first] * embeddings[second], axis=1)
    small = np.sum(sketches[first] * sketches[second], axis=1)
    error = np.abs(full - small)

    assert np.corrcoef(full, small)[0, 1] > 0.8
    assert error.mean() < 0.1
    # Close pairs, which decide near-duplicates, are estimated more precisely.
    assert error[full >= 0.6].mean() < 0.06


def test_sketch_encoding_round_trip(featurizer):
    sketch = featurizer.sketch("book a table for two at seven")
    encoded = encode_sketch(sketch)
    decoded = decode_sketch(encoded)

    assert len(encoded) == 128  # 96 int8 values in base64
    assert float(decoded @ sketch) > 0.999


def test_featurizer_same_in_another_process(featurizer):
    """Replicas must agree on the hashes, whatever PYTHONHASHSEED they run with."""
    text = "how do i freeze my card"
    script = ("from edge_runtime.gateway.monitor import TextFeaturizer, encode_sketch; "
              f"print(encode_sketch(TextFeaturizer().sketch({text!r})))")
    environment = dict(os.environ, PYTHONHASHSEED="12345")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == encode_sketch(featurizer.sketch(text))


def test_frame_slots(reference):
    vocabulary = reference.frame_vocabulary
    frame = query_frame("how do i reset my password", vocabulary)

    assert frame == query_frame("how do i renew my passport", vocabulary)
    assert frame == "how do i <slot> my <slot>"
    assert query_frame("set a timer for 5 minutes", vocabulary) == query_frame(
        "set a timer for 10 minutes", vocabulary)
    assert "<num>" in query_frame("set a timer for 5 minutes", vocabulary)
    assert query_frame("tell me about Paris", vocabulary) == "tell me <slot> <name>"
    assert query_frame("what is the time", vocabulary) is None  # no slot: not a template
    assert query_frame("hello", vocabulary) is None


def test_record_round_trip(featurizer):
    sketches = quantize_sketch(featurizer.sketch("pay my bill"))[np.newaxis, :]
    window = Window(
        ids=["a1b2c3d4e5f6"], digests=["00112233aabbccdd"], frames=["0123456789ab"],
        labels=["=odd|label"], ood_distances=np.array([0.4321]), nearest=np.array([0.25]),
        nearest_same_label=np.array([math.nan]), repeats=np.array([True]),
        sketches=sketches, inverse_norms=np.array([1.0], dtype=np.float32),
    )
    stored = format_record(window)
    parsed = Window.parse([stored, "2|from|a|future|version|x|y|z|w|v", "1|short"], 96)

    assert record_id(stored) == "a1b2c3d4e5f6"
    assert len(parsed) == 1
    assert parsed.ids == window.ids
    assert parsed.digests == window.digests
    assert parsed.frames == window.frames
    assert parsed.labels == ["=odd|label"]
    assert parsed.ood_distances[0] == pytest.approx(0.4321)
    assert parsed.nearest[0] == pytest.approx(0.25)
    assert math.isnan(parsed.nearest_same_label[0])
    assert parsed.repeats.tolist() == [True]
    assert np.array_equal(parsed.sketches, sketches)
    assert parsed.cosines(featurizer.sketch("pay my bill"))[0] == pytest.approx(1.0, abs=0.01)


# ---------------------------------------------------------------------------------------------
# Reference set, coverage, risk and tiers


def test_ood_threshold_calibration(reference, featurizer, clinc):
    def ood_share(texts: list[str]) -> float:
        distances = [reference.ood_distance(featurizer.embed(text)) for text in texts]
        return float(np.mean(np.array(distances) > reference.ood_threshold))

    in_domain = [example.text for example in clinc["test"] if example.label != "oos"]
    wiki = wiki_sentences()[:1000]
    banking = banking77_texts()[:1000]

    # The threshold is the 95th percentile of the validation split's distances.
    assert 0.02 <= ood_share(in_domain) <= 0.08
    assert ood_share(wiki) > 0.8
    assert ood_share(banking) > 0.25


def test_label_coverage_even_versus_narrow(reference):
    labels = sorted(label for label in reference.label_frequencies if label != "oos")
    rng = random.Random(5)
    even = [rng.choice(labels) for _ in range(300)]
    narrow = [rng.choice(labels[:8]) for _ in range(300)]

    assert label_coverage(even, reference) > 0.8
    assert label_coverage(narrow, reference) < 0.25
    assert label_coverage(["balance"] * 300, reference) == 0.0
    assert label_coverage([], reference) == 0.0


def test_expected_distinct_labels(reference):
    assert reference.expected_distinct_labels(0) == 0.0
    assert reference.expected_distinct_labels(1) == pytest.approx(1.0)
    assert reference.expected_distinct_labels(10_000) == pytest.approx(reference.label_count,
                                                                       abs=0.5)


def test_risk_noisy_or():
    weights = {name: 0.5 for name in SIGNALS} | {"repeat": 0.75}
    quiet = {name: 0.0 for name in SIGNALS}

    assert combine_risk(quiet, weights) == 0.0
    assert combine_risk(quiet | {"repeat": 1.0}, weights) == pytest.approx(0.75)
    assert combine_risk(quiet | {"repeat": 1.0, "ood": 1.0}, weights) == pytest.approx(0.875)
    assert combine_risk({name: 1.0 for name in SIGNALS}, weights) <= 1.0


TIER_CASES = [
    # tier, risk, queries, queries in tier, expected
    (ALLOW, 0.99, 39, 39, ALLOW),    # fewer than min_queries: no change
    (ALLOW, 0.39, 100, 100, ALLOW),
    (ALLOW, 0.40, 100, 100, DEGRADE),
    (ALLOW, 0.85, 100, 100, BLOCK),
    (DEGRADE, 0.35, 100, 50, DEGRADE),  # below entry but not below exit
    (DEGRADE, 0.29, 100, 10, DEGRADE),  # below exit but too soon after the change
    (DEGRADE, 0.29, 100, 32, ALLOW),
    (DEGRADE, 0.86, 100, 1, BLOCK),
    (BLOCK, 0.80, 100, 50, BLOCK),     # below entry but not below exit
    (BLOCK, 0.10, 100, 50, DEGRADE),   # one step at a time
    (BLOCK, 0.10, 100, 5, BLOCK),
]


@pytest.mark.parametrize(("tier", "risk", "queries", "in_tier", "expected"), TIER_CASES)
def test_next_tier_hysteresis(tier, risk, queries, in_tier, expected):
    assert next_tier(tier, risk, queries, in_tier, MonitorConfig()) == expected


@pytest.mark.parametrize("overrides", [
    {"degrade_exit": 0.5},
    {"block_enter": 0.6},
    {"window": 6000},
    {"min_queries": 0},
    {"weights": {"repeat": 1.0}},
    {"ramps": dict.fromkeys(SIGNALS, (0.5, 0.5))},
    {"near_duplicate_cosine": 1.0},
], ids=["exit-above-entry", "block-below-degrade", "window", "min-queries", "weights",
        "ramps", "near-duplicate"])
def test_config_rejects_invalid(overrides):
    with pytest.raises(ConfigError):
        MonitorConfig(**overrides)


def test_monitor_rejects_other_dimension(reference):
    with pytest.raises(ConfigError, match="dimensions"):
        ClientMonitor(MemoryStateStore(), TextFeaturizer(dim=2048), reference)


# ---------------------------------------------------------------------------------------------
# Real traffic


def test_honest_clients_stay_allowed(reference, featurizer, teacher, honest_texts):
    monitor = ClientMonitor(MemoryStateStore(), featurizer, reference)
    config = monitor.config

    async def scenario():
        results = {}
        for client in range(4):
            texts = honest_texts[client * 300:(client + 1) * 300]
            results[f"honest-{client}"] = await replay(monitor, f"honest-{client}", texts,
                                                       teacher.labels(texts))
        return results

    for client_id, verdicts in run(scenario()).items():
        tiers = {verdict.tier for verdict in verdicts}
        highest = max(verdict.risk for verdict in verdicts[config.min_queries:])
        print(f"{client_id}: highest risk {highest:.3f} after {config.min_queries} queries")
        assert tiers == {ALLOW}, f"{client_id} reached {tiers}, highest risk {highest:.3f}"
        assert highest < config.degrade_enter


def attack_streams(clinc) -> dict[str, list[str]]:
    rng = random.Random(23)
    wiki = wiki_sentences()
    rng.shuffle(wiki)
    banking = banking77_texts()
    rng.shuffle(banking)
    templated = [rng.choice(TEMPLATES).format(verb=rng.choice(VERBS), noun=rng.choice(NOUNS))
                 for _ in range(ATTACK_BUDGET)]
    in_domain = [example.text for example in clinc["test"] if example.label != "oos"]
    rng.shuffle(in_domain)
    # Each query four times in a row, as an attacker averaging out randomised labels would.
    repeated = [text for text in in_domain[:ATTACK_BUDGET // 4] for _ in range(4)]
    # Each query with three small edits, so no two texts are equal.
    edited = [variant for text in in_domain[:ATTACK_BUDGET // 4]
              for variant in (text, text + "?", "please " + text, text[:-1])]
    return {"wikipedia": wiki[:ATTACK_BUDGET], "banking77": banking[:ATTACK_BUDGET],
            "templated": templated, "exact-repeat": repeated, "near-duplicate": edited}


@pytest.mark.parametrize("attack", ["wikipedia", "banking77", "templated", "exact-repeat",
                                    "near-duplicate"])
def test_attacker_flagged(attack, reference, featurizer, teacher, clinc, tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    monitor = ClientMonitor(MemoryStateStore(), featurizer, reference, audit=audit)
    texts = attack_streams(clinc)[attack]

    flagged_after = run(queries_until_flagged(monitor, f"attacker-{attack}", texts, teacher))

    print(f"{attack} attacker: flagged after {flagged_after} queries")
    assert flagged_after is not None, f"{attack} attacker not flagged in {ATTACK_BUDGET} queries"
    events = AuditLog.read(tmp_path / "audit.jsonl")
    assert len(events) == 1
    assert events[0]["client_id"] == f"attacker-{attack}"
    assert events[0]["old_tier"] == ALLOW
    assert events[0]["new_tier"] in (DEGRADE, BLOCK)
    assert events[0]["risk"] >= monitor.config.degrade_enter
    assert set(events[0]["signals"]) == set(SIGNALS)
    assert events[0]["reason"].startswith("risk rose")
    assert audit.events(f"attacker-{attack}") == events


def test_single_odd_query_no_flip(reference, featurizer, teacher, honest_texts):
    monitor = ClientMonitor(MemoryStateStore(), featurizer, reference)
    texts = honest_texts[:120]
    odd = wiki_sentences()[7]

    async def scenario():
        before = await replay(monitor, "steady", texts, teacher.labels(texts))
        wiki_verdict = await monitor.observe("steady", odd, teacher.labels([odd])[0])
        repeat_verdict = await monitor.observe("steady", texts[-1], teacher.labels(texts)[-1])
        return before[-1], wiki_verdict, repeat_verdict

    last, after_wiki, after_repeat = run(scenario())

    assert last.tier == ALLOW
    assert after_wiki.tier == ALLOW
    assert after_repeat.tier == ALLOW
    assert after_repeat.statistics["repeat"] == pytest.approx(1 / 122)
    assert abs(after_repeat.risk - last.risk) < 0.1


def test_degraded_client_returns_below_exit(reference, featurizer, teacher, honest_texts,
                                            clinc):
    """A degraded client whose risk falls just below the entry threshold stays degraded,
    and returns to allow only once its risk is below the exit threshold."""
    monitor = ClientMonitor(MemoryStateStore(), featurizer, reference)
    config = monitor.config
    attack = attack_streams(clinc)["templated"][:60]
    honest = honest_texts[:300]

    async def scenario():
        verdicts = await replay(monitor, "reformed", attack, teacher.labels(attack))
        verdicts += await replay(monitor, "reformed", honest, teacher.labels(honest))
        return verdicts

    verdicts = run(scenario())

    degraded_at = next(i for i, verdict in enumerate(verdicts) if verdict.tier == DEGRADE)
    assert degraded_at < len(attack)
    returned_at = next(i for i, verdict in enumerate(verdicts) if i > degraded_at
                       and verdict.tier == ALLOW)
    band = [verdict for verdict in verdicts[degraded_at:returned_at]
            if config.degrade_exit <= verdict.risk < config.degrade_enter]
    assert band, "the risk never dipped into the hysteresis band"
    assert all(verdict.tier == DEGRADE for verdict in band)
    assert verdicts[returned_at].risk < config.degrade_exit
    assert verdicts[returned_at].changed
    assert all(verdict.tier == ALLOW for verdict in verdicts[returned_at:])


# ---------------------------------------------------------------------------------------------
# Flags, audit log and state


def test_flag_blocks_and_audits(reference, featurizer, tmp_path):
    clock = FakeClock()
    audit = AuditLog(tmp_path / "audit.jsonl")
    config = MonitorConfig(min_queries=4, min_dwell_queries=4)
    monitor = ClientMonitor(MemoryStateStore(), featurizer, reference, config=config,
                            audit=audit, clock=clock)
    texts = ["what is my balance", "set an alarm for 7 am", "how is the weather today"]

    async def scenario():
        await replay(monitor, "canary-client", texts, ["balance", "alarm", "weather"])
        flag = await monitor.flag("canary-client", "canary: decoy tool lookup_wire_limits")
        tier_after_flag = await monitor.tier("canary-client")
        during = await monitor.observe("canary-client", "what time is it", "time")
        clock.now += config.flag_seconds + 1
        after = [await monitor.observe("canary-client", f"what is {n} plus {n}", "calculator")
                 for n in range(6)]
        return flag, tier_after_flag, during, after

    flag, tier_after_flag, during, after = run(scenario())

    assert flag.tier == BLOCK
    assert flag.changed
    assert tier_after_flag == BLOCK
    assert during.tier == BLOCK
    assert not during.changed
    # Once the flag has expired, the client leaves block like any other: one step down, after
    # min_dwell_queries queries in the tier (the flag came after the third query).
    assert [verdict.tier for verdict in after] == [BLOCK, BLOCK] + [DEGRADE] * 4

    events = AuditLog.read(tmp_path / "audit.jsonl")
    assert [(event["old_tier"], event["new_tier"]) for event in events] == [
        (ALLOW, BLOCK), (BLOCK, DEGRADE)]
    assert events[0]["client_id"] == "canary-client"
    assert events[0]["reason"] == "flag: canary: decoy tool lookup_wire_limits"
    assert {"time", "risk", "signals", "statistics"} <= set(events[0])
    assert audit.events("canary-client") == events
    assert audit.events("someone-else") == []


def test_flag_needs_reason(reference, featurizer):
    monitor = ClientMonitor(MemoryStateStore(), featurizer, reference)
    with pytest.raises(ValueError, match="reason"):
        run(monitor.flag("client", "  "))


def test_audit_log_unwritable_path(tmp_path):
    missing = tmp_path / "no-such-directory" / "audit.jsonl"
    with pytest.raises(AuditLogError, match="no-such-directory.*writable directory"):
        AuditLog(missing)
    with pytest.raises(AuditLogError, match="writable directory"):
        AuditLog(tmp_path)  # a directory, not a file


def test_audit_log_appends_lines(tmp_path):
    path = tmp_path / "audit.jsonl"
    first = AuditLog(path)
    first.append({"client_id": "a", "new_tier": BLOCK})
    first.close()
    second = AuditLog(path)
    second.append({"client_id": "b", "new_tier": DEGRADE})

    lines = path.read_text().splitlines()
    assert [json.loads(line)["client_id"] for line in lines] == ["a", "b"]
    assert second.events() == [{"client_id": "b", "new_tier": DEGRADE}]
    second.close()
    with pytest.raises(AuditLogError, match="closed"):
        second.append({"client_id": "c"})


def test_store_keys_hash_client_id(reference, featurizer):
    store = MemoryStateStore()
    monitor = ClientMonitor(store, featurizer, reference)
    run(monitor.observe("key-id-alice", "what is my balance", "balance"))

    keys = run(store.keys(""))
    assert sorted(keys) == sorted([client_key("key-id-alice") + ":window",
                                   client_key("key-id-alice") + ":state"])
    assert not any("alice" in key for key in keys)


def test_state_expires_after_ttl(reference, featurizer):
    store_clock = FakeClock()
    store = MemoryStateStore(clock=store_clock)
    config = MonitorConfig(state_ttl_seconds=60.0)
    monitor = ClientMonitor(store, featurizer, reference, config=config)

    async def scenario():
        for _ in range(3):
            await monitor.observe("idle", "what is my balance", "balance")
        store_clock.now += 61.0
        return await monitor.observe("idle", "what is my balance", "balance")

    verdict = run(scenario())

    assert verdict.queries == 1
    assert verdict.statistics["repeat"] == 0.0


def test_window_cache_matches_store(reference, featurizer, teacher, honest_texts, clinc):
    """A monitor with a window cache computes what one without it computes."""
    cached = ClientMonitor(MemoryStateStore(), featurizer, reference)
    uncached = ClientMonitor(MemoryStateStore(), featurizer, reference, cache_clients=0)
    texts = honest_texts[:150] + attack_streams(clinc)["exact-repeat"][:150]
    labels = teacher.labels(texts)

    with_cache = run(replay(cached, "client", texts, labels))
    without_cache = run(replay(uncached, "client", texts, labels))

    assert [v.statistics for v in with_cache] == [v.statistics for v in without_cache]
    assert [v.tier for v in with_cache] == [v.tier for v in without_cache]


def test_concurrent_observes_keep_window(reference, featurizer):
    """Calls that overlap in one process leave the cache out of step, so the next call must
    notice and read the whole window from the store."""
    store = MemoryStateStore()
    monitor = ClientMonitor(store, featurizer, reference)
    texts = [f"what is {n} times {n + 1}" for n in range(8)]

    async def scenario():
        await monitor.observe("busy", "what is my balance", "balance")
        await asyncio.gather(*(monitor.observe("busy", text, "calculator") for text in texts))
        return await monitor.observe("busy", "what is my balance", "balance")

    verdict = run(scenario())

    assert verdict.statistics["queries"] == 10.0
    assert verdict.statistics["repeat"] == pytest.approx(1 / 10)
    assert len(run(store.items(client_key("busy") + ":window"))) == 10


def test_replicas_share_redis_view(redis_url, reference, featurizer, teacher, clinc):
    prefix = "test-monitor:replicas:"
    stores = [RedisStateStore(redis_url, prefix=prefix) for _ in range(2)]
    replicas = [ClientMonitor(store, featurizer, reference) for store in stores]
    texts = attack_streams(clinc)["exact-repeat"][:80]
    labels = teacher.labels(texts)

    async def scenario():
        verdicts = []
        for index, (text, label) in enumerate(zip(texts, labels, strict=True)):
            verdicts.append(await replicas[index % 2].observe("shared", text, label))
        tiers = [await replica.tier("shared") for replica in replicas]
        window = await stores[1].items(client_key("shared") + ":window")
        await replicas[0].flag("bystander", "canary: decoy tool name")
        bystander = await replicas[1].tier("bystander")
        for store in stores:
            await store.close()
        return verdicts, tiers, window, bystander

    verdicts, tiers, window, bystander = run(scenario())

    assert [verdict.queries for verdict in verdicts] == list(range(1, len(texts) + 1))
    assert len(window) == len(texts)
    # Every fourth query is new, so three in four are repeats of the other replica's queries.
    assert verdicts[-1].statistics["repeat"] == pytest.approx(0.75)
    assert verdicts[-1].tier != ALLOW
    assert tiers == [verdicts[-1].tier, verdicts[-1].tier]
    assert bystander == BLOCK
