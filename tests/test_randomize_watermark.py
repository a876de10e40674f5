"""Keyed output randomization, the answer watermark, its ledger and its verifier.

The verifier tests answer real CLINC150 training queries with the bundled teacher package, as
the gateway's ONNX backend does, but only the few hundred queries that the watermark marks or
keeps as controls.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import subprocess
import sys
import threading
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edge_runtime import cli
from edge_runtime.data import load_split
from edge_runtime.errors import ConfigError, DataFormatError
from edge_runtime.gateway.randomize import (
    KeyedRandomizer,
    normalize_query,
    secret_from_env,
)
from edge_runtime.gateway.state import MemoryStateStore, RedisStateStore
from edge_runtime.gateway.watermark import (
    MAX_RATE,
    LedgerEntry,
    Watermark,
    WatermarkError,
    WatermarkLedger,
    binomial_cdf,
    binomial_tail,
    client_hash,
    clopper_pearson_upper,
    verify_suspect,
)
from edge_runtime.package import read_package
from tests.conftest import CLI_TRUST, CLINC150_DIR, MODELS_DIR, ROOT, demo_trust, require_clinc150

RANDOMIZER_SECRET = hashlib.sha256(b"test randomizer secret").digest()
WATERMARK_SECRET = hashlib.sha256(b"test watermark secret").digest()
TEACHER_PACKAGE = MODELS_DIR / "clinc150-teacher.edgepkg"
STUDENT_PACKAGE = MODELS_DIR / "clinc150-student.edgepkg"
CLIENT = "alice-key-7f3a"
NEAR_TIE = (("set_alarm", 0.40), ("timer", 0.38), ("reminder", 0.1))


def run(coroutine):
    return asyncio.run(coroutine)


# ---------------------------------------------------------------------------------------------
# normalize_query


@pytest.mark.parametrize("variant", [
    "set an alarm for 7 am",
    "Set an alarm for 7 AM?",
    "  set   an\talarm for 7 am\n",
    "SET AN ALARM FOR 7 AM!!",
    "\uff33et an alarm for \uff17 am",  # full-width S and 7
    "set an\u200b alarm for 7 am",  # zero-width space
    "...set an alarm for 7 am...",
])
def test_normalize_trivial_variants_equal(variant):
    assert normalize_query(variant) == "set an alarm for 7 am"


def test_normalize_paraphrases_differ():
    paraphrases = ["set an alarm for 7 am", "wake me up at 7 am", "set an alarm for 7 pm",
                   "set alarm for 7 am", "set an alarm for seven am"]

    normalized = {normalize_query(text) for text in paraphrases}

    assert len(normalized) == len(paraphrases)


def test_normalize_keeps_inner_punctuation():
    assert normalize_query("What's my balance?") == "what's my balance"
    assert normalize_query("Straße") == "strasse"
    assert normalize_query("???") == ""


# ---------------------------------------------------------------------------------------------
# Secrets


def test_short_secret_names_fix():
    with pytest.raises(ConfigError) as raised:
        KeyedRandomizer(b"x" * 31)

    assert "31 bytes" in str(raised.value)
    assert "token_hex(32)" in str(raised.value)


def test_text_secret_rejected():
    with pytest.raises(ConfigError, match="must be bytes"):
        Watermark("0" * 64)


def test_secret_from_env(monkeypatch):
    monkeypatch.setenv("TEST_WM_SECRET", RANDOMIZER_SECRET.hex())
    assert secret_from_env("TEST_WM_SECRET") == RANDOMIZER_SECRET

    monkeypatch.delenv("TEST_WM_SECRET")
    with pytest.raises(ConfigError, match="TEST_WM_SECRET is not set"):
        secret_from_env("TEST_WM_SECRET")

    monkeypatch.setenv("TEST_WM_SECRET", "not hex at all")
    with pytest.raises(ConfigError, match="not valid hex") as raised:
        secret_from_env("TEST_WM_SECRET")
    assert "not hex at all" not in str(raised.value)

    monkeypatch.setenv("TEST_WM_SECRET", "ab" * 16)
    with pytest.raises(ConfigError, match="16 bytes"):
        secret_from_env("TEST_WM_SECRET")


def test_repr_hides_secret():
    reprs = repr(KeyedRandomizer(RANDOMIZER_SECRET)) + repr(Watermark(WATERMARK_SECRET))

    assert RANDOMIZER_SECRET.hex() not in reprs
    assert WATERMARK_SECRET.hex() not in reprs
    assert repr(RANDOMIZER_SECRET) not in reprs


# ---------------------------------------------------------------------------------------------
# KeyedRandomizer


@pytest.fixture(scope="module")
def clinc_train():
    require_clinc150()
    return load_split(CLINC150_DIR, "train")


def test_choice_stable_for_repeats(clinc_train):
    randomizer = KeyedRandomizer(RANDOMIZER_SECRET)
    again = KeyedRandomizer(RANDOMIZER_SECRET)

    for example in clinc_train[:300]:
        first = randomizer.choose(example.text, NEAR_TIE, "allow")
        assert randomizer.choose(example.text, NEAR_TIE, "allow") == first
        assert randomizer.choose(example.text.upper() + " ?", NEAR_TIE, "allow") == first
        assert again.choose(example.text, NEAR_TIE, "allow") == first


def test_choice_spread_across_queries(clinc_train):
    randomizer = KeyedRandomizer(RANDOMIZER_SECRET)
    other_key = KeyedRandomizer(hashlib.sha256(b"another key").digest())
    texts = [example.text for example in clinc_train[::15]]  # 1000 queries, every intent

    chosen = [randomizer.choose(text, NEAR_TIE, "allow") for text in texts]
    other = [other_key.choose(text, NEAR_TIE, "allow") for text in texts]

    runner_up_share = chosen.count("timer") / len(texts)
    agreement = sum(a == b for a, b in zip(chosen, other, strict=True)) / len(texts)
    assert set(chosen) == {"set_alarm", "timer"}
    assert 0.42 < runner_up_share < 0.58
    assert 0.42 < agreement < 0.58


def test_choice_ignores_rank_order(clinc_train):
    randomizer = KeyedRandomizer(RANDOMIZER_SECRET)
    ranked = (("set_alarm", 0.40), ("timer", 0.39))
    swapped = (("timer", 0.40), ("set_alarm", 0.39))

    for example in clinc_train[:200]:
        assert (randomizer.choose(example.text, ranked, "allow")
                == randomizer.choose(example.text, swapped, "allow"))


@pytest.mark.parametrize(("gap", "tier", "randomized"), [
    (0.05, "allow", True),
    (0.2, "allow", True),  # a gap equal to the margin is a near-tie
    (0.25, "allow", False),
    (0.25, "degrade", True),
    (0.5, "degrade", True),
    (0.55, "degrade", False),
    (0.25, "standard", False),  # any tier but "degrade" gets the default margin
])
def test_margin_per_tier(clinc_train, gap, tier, randomized):
    randomizer = KeyedRandomizer(RANDOMIZER_SECRET, margin=0.2, degraded_margin=0.5)
    candidates = (("set_alarm", 0.2 + gap), ("timer", 0.2), ("reminder", 0.1))

    chosen = {randomizer.choose(example.text, candidates, tier)
              for example in clinc_train[:100]}

    assert chosen == ({"set_alarm", "timer"} if randomized else {"set_alarm"})


def test_single_candidate_is_answer():
    randomizer = KeyedRandomizer(RANDOMIZER_SECRET, margin=1.0, degraded_margin=1.0)

    assert randomizer.choose("hello", (("greeting", 0.3),), "degrade") == "greeting"


@pytest.mark.parametrize("candidates", [
    (),
    (("a", 0.3), ("b", 0.5)),  # not best first
    (("a", 1.5), ("b", 0.1)),
    (("a", float("nan")), ("b", 0.1)),
    (("a", 0.5), ("a", 0.4)),
    (("a", 0.5, "extra"),),
    "a",
])
def test_invalid_candidates_rejected(candidates):
    with pytest.raises(ValueError):
        KeyedRandomizer(RANDOMIZER_SECRET).choose("hello", candidates, "allow")


@pytest.mark.parametrize(("margin", "degraded_margin"), [(0.3, 0.2), (-0.1, 0.5), (0.1, 1.5)])
def test_invalid_margins_rejected(margin, degraded_margin):
    with pytest.raises(ConfigError):
        KeyedRandomizer(RANDOMIZER_SECRET, margin=margin, degraded_margin=degraded_margin)


# ---------------------------------------------------------------------------------------------
# Watermark


@pytest.mark.parametrize("rate", [0.0051, 0.01, -0.001, float("nan"), True])
def test_rate_above_bound_rejected(rate):
    with pytest.raises(ConfigError, match="rate"):
        Watermark(WATERMARK_SECRET, rate=rate)


def test_marked_share_near_rate(clinc_train):
    watermark = Watermark(WATERMARK_SECRET, rate=MAX_RATE, control_rate=0.03)
    normalized = [normalize_query(example.text) for example in clinc_train]

    marked = [text for text in normalized if watermark.is_marked(text)]
    controls = [text for text in normalized if watermark.is_control(text)]

    # Binomial(15,100, 0.005) has mean 75.5 and standard deviation 8.7.
    assert 0.003 < len(marked) / len(normalized) < 0.007
    assert 0.025 < len(controls) / len(normalized) < 0.035
    assert not set(marked) & set(controls)
    assert all(watermark.is_marked(normalize_query(text.upper() + " !")) for text in marked)


def test_alternative_never_top(clinc_train):
    watermark = Watermark(WATERMARK_SECRET)
    labels = sorted({example.label for example in clinc_train})
    counts = {rank: 0 for rank in range(1, 5)}

    for index, example in enumerate(clinc_train[:2000]):
        ranked = [(labels[(index + offset) % len(labels)], 0.5 / (offset + 1))
                  for offset in range(5)]
        normalized = normalize_query(example.text)
        alternative = watermark.alternative(normalized, ranked, labels)
        assert alternative != ranked[0][0]
        assert alternative == watermark.alternative(normalized, ranked, labels)
        counts[[label for label, _ in ranked].index(alternative)] += 1

    # Each of the four runners-up gets about a quarter of the queries.
    assert all(350 < count < 650 for count in counts.values()), counts


def test_alternative_without_runners_up(clinc_train):
    watermark = Watermark(WATERMARK_SECRET)
    labels = sorted({example.label for example in clinc_train})

    chosen = {watermark.alternative(normalize_query(example.text), (("balance", 0.9),), labels)
              for example in clinc_train[:500]}

    assert "balance" not in chosen
    assert chosen <= set(labels)
    assert len(chosen) > 50
    with pytest.raises(ValueError, match="no alternative"):
        watermark.alternative("hello", (("balance", 0.9),), ["balance"])


# ---------------------------------------------------------------------------------------------
# Ledger


@pytest.fixture(params=["memory", "redis"])
def store_factory(request):
    if request.param == "memory":
        return MemoryStateStore
    url = request.getfixturevalue("redis_url")
    return lambda: RedisStateStore(url, prefix=f"test-wm:{request.node.name}:")


async def _record_sample(ledger: WatermarkLedger) -> None:
    await ledger.record(CLIENT, "what is my balance", "transfer", "balance", True)
    await ledger.record(CLIENT, "book a flight to denver", "book_flight", "book_flight", False,
                        alternative="book_hotel")
    await ledger.record(CLIENT, "set an alarm for 7 am", "timer", "alarm", False,
                        alternative="timer")  # a randomized near-tie
    await ledger.record("bob", "how do i say hello in french", "translate", "translate", False,
                        alternative="spelling")


def test_ledger_round_trip(store_factory, tmp_path):
    async def scenario():
        store = store_factory()
        ledger = WatermarkLedger(store, clock=iter(range(100, 200)).__next__)
        await _record_sample(ledger)
        entries = await ledger.entries(CLIENT)
        written = await ledger.export(CLIENT, tmp_path / "ledger.jsonl")
        keys = await store.keys("")
        await store.close()
        return entries, written, keys

    entries, written, keys = run(scenario())

    assert [(entry.text, entry.marked) for entry in entries] == [
        ("what is my balance", True),
        ("set an alarm for 7 am", False),
        ("book a flight to denver", False),
    ]
    assert entries[0].alternative == "transfer"
    assert entries[1].alternative == "timer"
    assert entries[2].given_label == "book_flight"
    assert {entry.client for entry in entries} == {client_hash(CLIENT)}
    assert written == 3
    assert WatermarkLedger.load(tmp_path / "ledger.jsonl") == entries
    assert keys
    assert not any(CLIENT in key or "bob" in key for key in keys)


def test_ledger_records_repeat_once():
    async def scenario():
        ledger = WatermarkLedger(MemoryStateStore())
        first = await ledger.record(CLIENT, "what is my balance", "transfer", "balance", True)
        repeat = await ledger.record(CLIENT, "what is my balance", "transfer", "balance", True)
        return first, repeat, await ledger.entries(CLIENT)

    first, repeat, entries = run(scenario())

    assert first is True
    assert repeat is False
    assert len(entries) == 1


def test_ledger_keeps_newest():
    async def scenario():
        ledger = WatermarkLedger(MemoryStateStore(), max_marked=3)
        for index in range(5):
            await ledger.record(CLIENT, f"query {index}", "transfer", "balance", True)
        return await ledger.entries(CLIENT)

    entries = run(scenario())

    assert [entry.text for entry in entries] == ["query 4", "query 3", "query 2"]


@pytest.mark.parametrize(("given", "top", "marked", "alternative", "message"), [
    ("balance", "balance", True, None, "equals the top-1"),
    ("balance", "balance", False, None, "needs the watermark's alternative"),
    ("balance", "balance", False, "balance", "equals the top-1"),
    ("transfer", "balance", True, "bill_due", "label it was given"),
    ("", "balance", False, "transfer", "given_label"),
])
def test_ledger_rejects_bad_record(given, top, marked, alternative, message):
    ledger = WatermarkLedger(MemoryStateStore())

    with pytest.raises(ValueError, match=message):
        run(ledger.record(CLIENT, "what is my balance", given, top, marked,
                          alternative=alternative))


def test_ledger_load_names_line(tmp_path):
    entry = LedgerEntry(client_hash(CLIENT), "hello", "greeting", "greeting", "goodbye", False,
                        1.0)
    good = json.dumps(entry.__dict__)
    path = tmp_path / "ledger.jsonl"
    path.write_text(good + "\n" + good.replace('"marked": false', '"marked": "no"') + "\n")

    with pytest.raises(DataFormatError) as raised:
        WatermarkLedger.load(path)

    assert raised.value.line == 2
    assert raised.value.field == "marked"


# ---------------------------------------------------------------------------------------------
# Binomial statistics


@pytest.mark.parametrize(("k", "n", "p", "expected"), [
    (3, 5, 0.5, 16 / 32),  # (10 + 5 + 1) / 2^5
    (1, 10, 0.1, 1 - 0.9**10),
    (10, 10, 0.5, 1 / 1024),
    (2, 4, 0.25, 1 - 0.75**4 - 4 * 0.25 * 0.75**3),  # 0.26171875
    (0, 7, 0.3, 1.0),
    (8, 7, 0.3, 0.0),
    (1, 5, 0.0, 0.0),
    (5, 5, 1.0, 1.0),
])
def test_binomial_tail_hand_values(k, n, p, expected):
    assert binomial_tail(k, n, p) == pytest.approx(expected, rel=1e-12, abs=1e-300)


def test_binomial_tail_far_in_tail():
    # P(X >= 60) for X ~ Binomial(60, 0.05) is 0.05^60, below what a float product keeps.
    expected = math.exp(60 * math.log(0.05))

    assert binomial_tail(60, 60, 0.05) == pytest.approx(expected, rel=1e-9)


def test_binomial_cdf_hand_values():
    assert binomial_cdf(1, 3, 0.5) == pytest.approx(4 / 8, rel=1e-12)
    assert binomial_cdf(0, 10, 0.1) == pytest.approx(0.9**10, rel=1e-12)
    assert binomial_cdf(-1, 10, 0.1) == 0.0


def test_clopper_pearson_hand_values():
    # With no successes the bound has the closed form 1 - alpha^(1/n).
    assert clopper_pearson_upper(0, 425, 1e-7) == pytest.approx(1 - 1e-7 ** (1 / 425),
                                                                rel=1e-9)
    assert clopper_pearson_upper(0, 10, 0.05) == pytest.approx(1 - 0.05**0.1, rel=1e-9)
    # One success in two trials: P(X <= 1) = 1 - p^2 = alpha, so p = sqrt(1 - alpha).
    assert clopper_pearson_upper(1, 2, 0.19) == pytest.approx(0.9, rel=1e-9)
    assert clopper_pearson_upper(4, 4, 0.05) == 1.0
    assert clopper_pearson_upper(0, 0, 0.05) == 1.0


def test_clopper_pearson_never_below_exact():
    for k, n in [(5, 100), (30, 412), (0, 88)]:
        upper = clopper_pearson_upper(k, n, 1e-7)
        assert binomial_cdf(k, n, upper) <= 1e-7
        assert binomial_cdf(k, n, upper - 1e-9) > 1e-7


# ---------------------------------------------------------------------------------------------
# Verifier on real CLINC150 queries and the bundled teacher


@dataclass
class Harvest:
    entries: list[LedgerEntry]
    returned: dict[str, str]  # normalized query -> label the gateway returned
    gold: dict[str, str]
    runner_up: dict[str, str]  # the teacher's second label
    labels: list[str]


async def _answer_as_gateway(examples, watermark, randomizer) -> Harvest:
    from edge_runtime.gateway.backends import OnnxTeacherBackend
    from edge_runtime.model import OnnxClassifier

    teacher = OnnxClassifier.from_file(str(TEACHER_PACKAGE), trust=demo_trust())
    backend = OnnxTeacherBackend(teacher)
    labels = list(teacher.labels)
    ledger = WatermarkLedger(MemoryStateStore())
    harvest = Harvest([], {}, {}, {}, labels)
    for example in examples:
        normalized = normalize_query(example.text)
        marked = watermark.is_marked(normalized)
        if not marked and not watermark.is_control(normalized):
            continue  # the ledger does not record these queries, so the teacher need not run
        reply = await backend.predict(example.text, None, "test")
        alternative = watermark.alternative(normalized, reply.candidates, labels)
        label = alternative if marked else randomizer.choose(example.text, reply.candidates,
                                                             "allow")
        await ledger.record(CLIENT, normalized, label, reply.label, marked,
                            alternative=alternative)
        harvest.returned[normalized] = label
        harvest.gold[normalized] = example.label
        harvest.runner_up[normalized] = reply.candidates[1][0]
    harvest.entries = await ledger.entries(CLIENT)
    return harvest


@pytest.fixture(scope="module")
def harvest(clinc_train) -> Harvest:
    """The ledger of a client who sent every CLINC150 training query through the gateway."""
    pytest.importorskip("starlette")
    watermark = Watermark(WATERMARK_SECRET, rate=MAX_RATE)
    return run(_answer_as_gateway(clinc_train, watermark, KeyedRandomizer(RANDOMIZER_SECRET)))


def forgetful_clone(harvest: Harvest):
    """A clone that memorized the returned label of 70% of its training queries."""
    def predict(texts):
        return [harvest.returned[text] if zlib.crc32(text.encode()) % 10 < 7 else harvest.gold[text]
                for text in texts]
    return predict


def test_verifier_detects_forgetful_clone(harvest):
    result = verify_suspect(harvest.entries, forgetful_clone(harvest))

    upper = clopper_pearson_upper(result.control_matches, result.control_n, 1e-7)
    assert result.n + result.control_n <= 500
    assert result.n == sum(entry.marked for entry in harvest.entries)
    assert result.match_rate > 0.5
    assert result.control_upper == upper
    assert result.binomial_tail == binomial_tail(result.matches, result.n, upper)
    assert result.p_value == min(1.0, result.binomial_tail + 1e-7)
    assert result.p_value < 1e-6


def test_verifier_clears_gold_model(harvest):
    # Stands for a model trained independently on the gold labels, which fits its training set.
    result = verify_suspect(harvest.entries, lambda texts: [harvest.gold[t] for t in texts])

    assert result.p_value > 0.01


def test_verifier_clears_student(harvest):
    from edge_runtime.model import OnnxClassifier

    student = OnnxClassifier.from_file(str(STUDENT_PACKAGE), trust=demo_trust())

    def predict(texts):
        logits = student.predict_batch(list(texts))  # (len(texts), labels)
        return [student.labels[int(index)] for index in logits.argmax(axis=1)]

    result = verify_suspect(harvest.entries, predict)

    assert result.p_value > 0.01


def test_verifier_clears_runner_up_model(harvest):
    # A model that always gives the teacher's second label matches a runner-up alternative
    # about a quarter of the time, marked or not. Chance taken as 1 / labels would convict it.
    result = verify_suspect(harvest.entries, lambda texts: [harvest.runner_up[t] for t in texts])

    assert result.match_rate > 0.1
    assert result.control_rate > 0.1
    assert result.p_value > 0.01
    assert binomial_tail(result.matches, result.n, 1 / len(harvest.labels)) < 1e-6


def test_verifier_shuffles_marked_with_controls(harvest):
    received = []

    def record_queries(texts):
        received.extend(texts)
        return ["oos"] * len(texts)

    result = verify_suspect(harvest.entries, record_queries, max_queries=200)

    marked = {entry.text for entry in harvest.entries if entry.marked}
    positions = [index for index, text in enumerate(received) if text in marked]
    assert len(received) == 200
    assert result.n == len(positions) == min(len(marked), 100)
    assert positions != list(range(len(positions)))  # not all in front
    assert positions[-1] > len(received) // 2


def test_verifier_needs_marked_and_controls(harvest):
    controls = [entry for entry in harvest.entries if not entry.marked]

    with pytest.raises(WatermarkError, match="0 marked queries"):
        verify_suspect(controls, lambda texts: ["oos"] * len(texts))


def test_verifier_rejects_wrong_label_count(harvest):
    with pytest.raises(WatermarkError, match="one label per query"):
        verify_suspect(harvest.entries, lambda texts: ["oos"])


def test_verifier_uses_common_window():
    client = client_hash(CLIENT)
    marked = [LedgerEntry(client, f"marked {i}", "b", "a", "b", True, 100.0 + i)
              for i in range(10)]
    controls = [LedgerEntry(client, f"control {i}", "a", "a", "b", False, 90.0 + i)
                for i in range(20)]

    result = verify_suspect(marked + controls, lambda texts: ["a"] * len(texts))

    assert result.n == 10
    assert result.control_n == 10  # controls recorded before the oldest marked entry are left out


# ---------------------------------------------------------------------------------------------
# Command line


def _export(harvest: Harvest, path) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for entry in harvest.entries:
            out.write(json.dumps(entry.__dict__) + "\n")


class _CloneHandler(BaseHTTPRequestHandler):
    """POST /v1/predict in the gateway's protocol, answered by a forgetful clone."""

    predict = None

    def do_POST(self):  # noqa: N802 - the name http.server dispatches to
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/predict":
            self.send_error(404)
            return
        answer = json.dumps({"label": type(self).predict([body["text"]])[0],
                             "request_id": "test"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format, *args):  # noqa: A002 - the signature http.server calls
        pass


@pytest.fixture
def clone_server(harvest):
    handler = type("Handler", (_CloneHandler,), {"predict": staticmethod(forgetful_clone(harvest))})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_cli_verify_url_end_to_end(harvest, clone_server, tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    _export(harvest, ledger)
    command = [sys.executable, "-m", "edge_runtime", "watermark", "verify", "--ledger",
               str(ledger), "--client", CLIENT, "--url", clone_server]

    as_json = subprocess.run([*command, "--json"], capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
    as_text = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)

    assert as_json.returncode == 0, as_json.stderr
    body = json.loads(as_json.stdout)
    assert body["p_value"] < 1e-6
    assert body["n"] + body["control_n"] <= 500
    assert body["suspect"] == clone_server
    assert as_text.returncode == 0, as_text.stderr
    for fragment in ("match rate", "control rate", "p-value", f"n = {body['n']}"):
        assert fragment in as_text.stdout


def test_cli_verify_package(harvest, tmp_path, capsys):
    ledger = tmp_path / "ledger.jsonl"
    _export(harvest, ledger)

    code = cli.main(["watermark", "verify", "--ledger", str(ledger), "--client", CLIENT,
                     "--model", str(STUDENT_PACKAGE), "--json", *CLI_TRUST])

    body = json.loads(capsys.readouterr().out)
    assert code == 0
    assert body["p_value"] > 0.01
    assert body["n"] == sum(entry.marked for entry in harvest.entries)


def test_cli_verify_onnx_file(harvest, tmp_path, capsys):
    package = read_package(STUDENT_PACKAGE, demo_trust())
    (tmp_path / "model.onnx").write_bytes(package.model_bytes)
    (tmp_path / "tokenizer.json").write_text(package.tokenizer_json, encoding="utf-8")
    (tmp_path / "labels.json").write_text(json.dumps(list(package.manifest.labels)))
    ledger = tmp_path / "ledger.jsonl"
    _export(harvest, ledger)

    code = cli.main(["watermark", "verify", "--ledger", str(ledger), "--client", CLIENT,
                     "--model", str(tmp_path / "model.onnx"),
                     "--tokenizer", str(tmp_path / "tokenizer.json"),
                     "--labels", str(tmp_path / "labels.json"), "--json"])

    body = json.loads(capsys.readouterr().out)
    assert code == 0
    assert body["p_value"] > 0.01


@pytest.mark.parametrize(("arguments", "message"), [
    (["--client", "nobody", "--model", str(STUDENT_PACKAGE)], "no entries for client 'nobody'"),
    (["--client", CLIENT, "--model", "suspect.onnx"], "pass --tokenizer"),
    (["--client", CLIENT, "--url", "127.0.0.1:9"], "must start with http://"),
])
def test_cli_verify_errors_exit_2(harvest, tmp_path, capsys, arguments, message):
    ledger = tmp_path / "ledger.jsonl"
    _export(harvest, ledger)

    code = cli.main(["watermark", "verify", "--ledger", str(ledger), *arguments, *CLI_TRUST])

    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_export_from_redis(redis_url, tmp_path, capsys):
    prefix = "test-wm-export:"

    async def record():
        store = RedisStateStore(redis_url, prefix=prefix)
        await _record_sample(WatermarkLedger(store))
        entries = await WatermarkLedger(store).entries(CLIENT)
        await store.close()
        return entries

    entries = run(record())
    path = tmp_path / "exported.jsonl"

    code = cli.main(["watermark", "export", "--redis-url", redis_url, "--prefix", prefix,
                     "--client", CLIENT, "--ledger", str(path)])

    assert code == 0
    assert "wrote 3 entries" in capsys.readouterr().out
    assert WatermarkLedger.load(path) == entries
