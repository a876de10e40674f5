"""The cascade against a real gateway process, including the teacher dying mid-run."""

from __future__ import annotations

import json
import logging
import zipfile

import httpx
import pytest

from edge_runtime import (
    SOURCE_CACHE,
    SOURCE_LOCAL,
    SOURCE_LOCAL_OFFLINE,
    SOURCE_TEACHER,
    ConfigError,
    EdgeRuntime,
    PackageError,
    TeacherUnavailable,
)
from edge_runtime.data import load_split
from edge_runtime.escalation_log import EscalationLog, read_all
from edge_runtime.gateway.server import start_gateway
from edge_runtime.package import read_package, write_package
from edge_runtime.teacher_client import TeacherClient
from tests.conftest import CLINC150_DIR, SIGNER_PUBLIC, demo_trust, free_loopback_port

pytestmark = pytest.mark.slow

# A loopback URL where nothing listens: connections are refused at once.
CLOSED_URL = f"http://127.0.0.1:{free_loopback_port()}"


@pytest.fixture(scope="module")
def queries(tiny_build):
    labels = set(read_package(tiny_build.student_package, demo_trust()).manifest.labels)
    return [e.text for e in load_split(CLINC150_DIR, "val") if e.label in labels][:120]


def test_sources_follow_gate(tiny_build, tiny_gateway, queries):
    with EdgeRuntime.load(tiny_build.student_package, teacher_url=tiny_gateway.url,
                          debug=True, trust=demo_trust()) as runtime:
        answers = [runtime.answer(text) for text in queries]
    threshold = runtime.gate.threshold
    for answer in answers:
        expected = SOURCE_LOCAL if answer.debug["score"] >= threshold else SOURCE_TEACHER
        assert answer.source == expected
    sources = {answer.source for answer in answers}
    assert sources == {SOURCE_LOCAL, SOURCE_TEACHER}


def test_answer_hides_scores_by_default(tiny_build):
    with EdgeRuntime.load(tiny_build.student_package, trust=demo_trust()) as runtime:
        answer = runtime.answer("set an alarm for seven")
    assert answer.debug is None
    assert "teacher" not in answer.timings_ms
    assert answer.timings_ms["total"] >= answer.timings_ms["student"]


def test_no_teacher_answers_offline(tiny_build, queries):
    with EdgeRuntime.load(tiny_build.student_package, trust=demo_trust()) as runtime:
        answers = [runtime.answer(text) for text in queries]
    assert {a.source for a in answers} == {SOURCE_LOCAL, SOURCE_LOCAL_OFFLINE}


def test_teacher_killed_mid_run(tiny_build, queries):
    gateway = start_gateway(tiny_build.teacher_package, signer_keys=(str(SIGNER_PUBLIC),))
    try:
        runtime = EdgeRuntime.load(tiny_build.student_package, teacher_url=gateway.url,
                                   read_timeout=2.0, debug=True, trust=demo_trust())
        before = [runtime.answer(text) for text in queries[:60]]
        gateway.kill()
        after = [runtime.answer(text) for text in queries[60:]]
    finally:
        gateway.stop()
    assert SOURCE_TEACHER in {a.source for a in before}
    assert SOURCE_LOCAL_OFFLINE not in {a.source for a in before}
    assert SOURCE_TEACHER not in {a.source for a in after}
    assert SOURCE_LOCAL_OFFLINE in {a.source for a in after}
    for answer in after:
        probabilities = answer.debug["probabilities"]
        assert answer.label == max(probabilities, key=probabilities.get)


def test_teacher_restarted_is_used_again(tiny_build):
    gateway = start_gateway(tiny_build.teacher_package, signer_keys=(str(SIGNER_PUBLIC),))
    url = gateway.url
    gateway.kill()
    with EdgeRuntime.load(tiny_build.student_package, teacher_url=url,
                          trust=demo_trust()) as runtime:
        runtime.gate.threshold = 1.0  # escalate every query
        assert runtime.answer("what time is it").source == SOURCE_LOCAL_OFFLINE
        port = int(url.rsplit(":", 1)[1])
        restarted = start_gateway(tiny_build.teacher_package, port=port,
                                  signer_keys=(str(SIGNER_PUBLIC),))
        try:
            assert runtime.answer("what time is it").source == SOURCE_TEACHER
        finally:
            restarted.stop()


@pytest.mark.parametrize("text", ["", "   ", "x" * 10_001])
def test_invalid_text_raises(tiny_build, text):
    with EdgeRuntime.load(tiny_build.student_package, trust=demo_trust()) as runtime:
        with pytest.raises(ConfigError):
            runtime.answer(text)


def test_golden_mismatch_escalates_all(tiny_build, tiny_gateway, tmp_path):
    package = read_package(tiny_build.student_package, demo_trust())
    manifest = dict(package.manifest.raw)
    labels = package.manifest.labels
    manifest["golden"] = [
        {"text": item["text"], "label": next(other for other in labels if other != item["label"])}
        for item in manifest["golden"]
    ]
    manifest.pop("encryption")
    altered = write_package(tmp_path / "altered.edgepkg", manifest, package.members)
    trust = demo_trust(allow_unsigned=True)
    with EdgeRuntime.load(altered, teacher_url=tiny_gateway.url, trust=trust) as runtime:
        assert not runtime.student_trusted
        sources = {runtime.answer(text).source for text in ["set an alarm", "weather today"]}
    assert sources == {SOURCE_TEACHER}


def test_teacher_package_rejected(tiny_build):
    with pytest.raises(PackageError, match="no confidence gate"):
        EdgeRuntime.load(tiny_build.teacher_package, trust=demo_trust())


def test_tampered_package_rejected(tiny_build, tmp_path):
    with zipfile.ZipFile(tiny_build.student_package) as source:
        members = {name: source.read(name) for name in source.namelist()}
    model = bytearray(members["model.onnx"])
    model[len(model) // 2] ^= 0xFF
    members["model.onnx"] = bytes(model)
    target = tmp_path / "tampered.edgepkg"
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(PackageError, match="model.onnx"):
        EdgeRuntime.load(target, trust=demo_trust())


def test_unsigned_package_rejected_by_default(tiny_build, tmp_path):
    package = read_package(tiny_build.student_package, demo_trust())
    manifest = {k: v for k, v in package.manifest.raw.items() if k != "encryption"}
    unsigned = write_package(tmp_path / "unsigned.edgepkg", manifest, package.members)
    with pytest.raises(PackageError, match="not signed"):
        EdgeRuntime.load(unsigned, trust=demo_trust())


def test_default_trust_rejects_package(tiny_build):
    with pytest.raises(PackageError, match="no trusted signer keys"):
        EdgeRuntime.load(tiny_build.student_package)


class FakeTeacher:
    """A loopback HTTP server that answers every POST with a fixed status and JSON body."""

    def __init__(self, status: int, body: dict):
        import http.server
        import threading

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                data = json.dumps(outer.body).encode()
                self.send_response(outer.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.status, self.body = status, body
        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(
    ("status", "body"),
    [(400, {"title": "Invalid field 'text'"}), (200, {"label": "not_a_known_label"}),
     (200, {"nothing": 1})],
    ids=["rejected", "unknown-label", "no-label"],
)
def test_bad_teacher_reply_answers_offline(tiny_build, status, body):
    fake = FakeTeacher(status, body)
    try:
        with EdgeRuntime.load(tiny_build.student_package, teacher_url=fake.url,
                              trust=demo_trust()) as runtime:
            runtime.gate.threshold = 1.0  # escalate every query
            answer = runtime.answer("what time is it")
    finally:
        fake.close()
    assert answer.source == SOURCE_LOCAL_OFFLINE
    assert answer.label in runtime.student.labels


def test_surrogate_text_raises(tiny_build):
    with EdgeRuntime.load(tiny_build.student_package, trust=demo_trust()) as runtime:
        with pytest.raises(ConfigError, match="not valid Unicode"):
            runtime.answer("caf\udce9 alarm")


def test_slow_teacher_reply_times_out(tiny_build):
    import http.server
    import threading
    import time

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            body = b'{"label": "timer"}'
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            try:
                for byte in body:  # one byte every 0.2 s: each read is quick, the whole is not
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.2)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up at its deadline, which is what the test expects

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with EdgeRuntime.load(tiny_build.student_package, teacher_url=url, trust=demo_trust(),
                              connect_timeout=0.5, read_timeout=1.0) as runtime:
            runtime.gate.threshold = 1.0  # escalate every query
            answer = runtime.answer("what time is it")
    finally:
        server.shutdown()
        server.server_close()
    assert answer.source == SOURCE_LOCAL_OFFLINE


def test_local_only_route_never_asks(tiny_build, queries):
    # The URL has no server: any teacher call would come back local-offline.
    with EdgeRuntime.load(tiny_build.student_package, teacher_url=CLOSED_URL,
                          route="local-only", trust=demo_trust()) as runtime:
        answers = [runtime.answer(text) for text in queries[:40]]
    assert {answer.source for answer in answers} == {SOURCE_LOCAL}
    assert all("teacher" not in answer.timings_ms for answer in answers)


def test_prefer_teacher_route(tiny_build, tiny_gateway, queries):
    with EdgeRuntime.load(tiny_build.student_package, teacher_url=tiny_gateway.url,
                          route="prefer-teacher", trust=demo_trust()) as runtime:
        answers = [runtime.answer(text) for text in queries[:20]]
        local = runtime.answer(queries[0], route="local-only")
    assert {answer.source for answer in answers} == {SOURCE_TEACHER}
    assert all("student" not in answer.timings_ms for answer in answers)
    assert local.source == SOURCE_LOCAL


def test_prefer_teacher_falls_back_offline(tiny_build, queries):
    with EdgeRuntime.load(tiny_build.student_package, teacher_url=CLOSED_URL,
                          route="prefer-teacher", debug=True, trust=demo_trust()) as runtime:
        answers = [runtime.answer(text) for text in queries[:20]]
    assert {answer.source for answer in answers} == {SOURCE_LOCAL_OFFLINE}
    for answer in answers:
        probabilities = answer.debug["probabilities"]
        assert answer.label == max(probabilities, key=probabilities.get)


def test_teacher_only_route_raises_without_teacher(tiny_build, tiny_gateway):
    with EdgeRuntime.load(tiny_build.student_package, teacher_url=CLOSED_URL,
                          trust=demo_trust()) as runtime:
        with pytest.raises(TeacherUnavailable):
            runtime.answer("what is my balance", route="teacher-only")
    with EdgeRuntime.load(tiny_build.student_package, teacher_url=tiny_gateway.url,
                          trust=demo_trust()) as runtime:
        assert runtime.answer("what is my balance", route="teacher-only").source == \
            SOURCE_TEACHER


def test_route_validation(tiny_build):
    with pytest.raises(ConfigError, match="teacher-only route needs a teacher"):
        EdgeRuntime.load(tiny_build.student_package, route="teacher-only", trust=demo_trust())
    with EdgeRuntime.load(tiny_build.student_package, trust=demo_trust()) as runtime:
        with pytest.raises(ConfigError, match="is not a route"):
            runtime.answer("set an alarm", route="cloud-first")
        with pytest.raises(ConfigError, match="teacher-only route needs a teacher"):
            runtime.answer("set an alarm", route="teacher-only")


def test_repeated_teacher_failures_logged_once(tiny_build, queries, caplog):
    with caplog.at_level(logging.WARNING, logger="edge_runtime.runtime"):
        with EdgeRuntime.load(tiny_build.student_package, teacher_url=CLOSED_URL,
                              route="prefer-teacher", trust=demo_trust()) as runtime:
            answers = [runtime.answer(text) for text in queries[:30]]
    failures = [record for record in caplog.records
                if record.name == "edge_runtime.runtime" and "gave no answer" in record.message]
    assert len(answers) == 30
    assert len(failures) == 1


class CountingTransport(httpx.HTTPTransport):
    """An httpx transport that counts the requests it is asked to send."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return super().handle_request(request)


def test_stopped_teacher_costs_few_connections(tiny_build, queries):
    # 1,000 queries with the teacher stopped: every one escalates, every answer is the
    # student's, and once the breaker opens no query tries to connect.
    transport = CountingTransport()
    teacher = TeacherClient(CLOSED_URL, transport=transport)
    package = read_package(tiny_build.student_package, demo_trust())
    with EdgeRuntime(package, teacher=teacher, route="prefer-teacher",
                     answer_cache=False) as runtime:
        answers = [runtime.answer(queries[index % len(queries)]) for index in range(1000)]
        attempts_before_open = transport.requests
        breaker = teacher.breaker_state
        more = [runtime.answer(text) for text in queries[:100]]

    assert len(answers) == 1000
    assert {answer.source for answer in answers + more} == {SOURCE_LOCAL_OFFLINE}
    assert breaker == "open"
    assert transport.requests - attempts_before_open == 0
    assert attempts_before_open < 20


def test_cache_answers_repeated_query(tiny_build, queries):
    gateway = start_gateway(tiny_build.teacher_package, signer_keys=(str(SIGNER_PUBLIC),))
    try:
        with EdgeRuntime.load(tiny_build.student_package, teacher_url=gateway.url,
                              route="prefer-teacher", trust=demo_trust()) as runtime:
            first = runtime.answer("Set a timer for ten minutes!")
            gateway.kill()
            repeated = runtime.answer("set a timer for ten minutes")
            other = runtime.answer("what is the weather like")
    finally:
        gateway.stop()
    assert first.source == SOURCE_TEACHER
    assert repeated.source == SOURCE_CACHE
    assert repeated.label == first.label
    assert "teacher" not in repeated.timings_ms
    assert repeated.escalated
    assert other.source == SOURCE_LOCAL_OFFLINE
    assert runtime.answer_cache.stats.hits == 1


def test_cache_off_asks_teacher_again(tiny_build, tiny_gateway):
    with EdgeRuntime.load(tiny_build.student_package, teacher_url=tiny_gateway.url,
                          route="prefer-teacher", answer_cache=False,
                          trust=demo_trust()) as runtime:
        sources = [runtime.answer("what is my balance").source for _ in range(3)]
    assert sources == [SOURCE_TEACHER] * 3
    assert runtime.answer_cache is None


def test_escalation_log_records_escalations(tiny_build, tiny_gateway, queries, tmp_path):
    log_path = tmp_path / "escalations.sqlite"
    with EscalationLog(log_path) as escalations:
        with EdgeRuntime.load(tiny_build.student_package, teacher_url=tiny_gateway.url,
                              escalation_log=escalations, answer_cache=False,
                              trust=demo_trust()) as runtime:
            answers = [runtime.answer(text) for text in queries[:60]]
        with EdgeRuntime.load(tiny_build.student_package, teacher_url=CLOSED_URL,
                              route="prefer-teacher", escalation_log=escalations,
                              trust=demo_trust()) as offline:
            offline_answer = offline.answer("call mom at +1 415 555 0100")
    records = read_all(log_path)

    escalated = [answer for answer in answers if answer.source == SOURCE_TEACHER]
    assert escalated
    assert len(records) == len(escalated) + 1
    assert [record.teacher_label for record in records[:-1]] == \
        [answer.label for answer in escalated]
    last = records[-1]
    assert last.source == SOURCE_LOCAL_OFFLINE
    assert last.teacher_label is None
    assert last.student_label == offline_answer.label
    assert "555" not in last.text


def test_answer_many_matches_answer(tiny_build, tiny_gateway, queries):
    with EdgeRuntime.load(tiny_build.student_package, teacher_url=tiny_gateway.url,
                          answer_cache=False, trust=demo_trust()) as runtime:
        one_by_one = [runtime.answer(text) for text in queries[:40]]
        batched_single = runtime.answer_many(queries[:40], batch_size=1)
        batched = runtime.answer_many(queries[:40], batch_size=16)
    assert [(a.label, a.source) for a in batched_single] == \
        [(a.label, a.source) for a in one_by_one]
    agreeing = sum(a.label == b.label for a, b in zip(batched, one_by_one, strict=True))
    assert agreeing >= 36  # int8 batches move logits a little (OnnxClassifier.predict_batch)
    assert all(answer.timings_ms["student"] > 0 for answer in batched)


def test_answer_many_rejects_bad_input(tiny_build):
    with EdgeRuntime.load(tiny_build.student_package, trust=demo_trust()) as runtime:
        with pytest.raises(ConfigError, match="list of str"):
            runtime.answer_many("one string")
        with pytest.raises(ConfigError, match="empty"):
            runtime.answer_many(["fine", "  "])
        assert runtime.answer_many([]) == []


def test_session_options_reach_student(tiny_build):
    with EdgeRuntime.load(tiny_build.student_package, trust=demo_trust(),
                          session_options={"graph_optimization": "basic",
                                           "inter_op_threads": 2}) as runtime:
        assert runtime.student.graph_optimization == "basic"
        assert runtime.student.inter_op_threads == 2
        assert runtime.answer("set an alarm for seven").source in (SOURCE_LOCAL,
                                                                    SOURCE_LOCAL_OFFLINE)
    with pytest.raises(ConfigError, match="unknown session option"):
        EdgeRuntime.load(tiny_build.student_package, trust=demo_trust(),
                         session_options={"intra_threads": 4})
