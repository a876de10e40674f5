"""The gateway as a real process on loopback, driven by a real HTTP client."""

from __future__ import annotations

import httpx
import pytest

from edge_runtime.gateway.app import TERMS_NOTICE
from edge_runtime.gateway.config import LimitsConfig
from edge_runtime.package import read_package

pytestmark = pytest.mark.slow

MAX_BODY_BYTES = LimitsConfig().max_body_bytes
MAX_TEXT_CHARS = LimitsConfig().max_text_chars

PROBLEM_TYPE = "application/problem+json"


@pytest.fixture(scope="module")
def client(tiny_gateway):
    with httpx.Client(base_url=tiny_gateway.url, timeout=10.0) as http:
        yield http


def test_healthz_ok(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_predict_returns_label_only(client, tiny_build):
    labels = read_package(tiny_build.teacher_package).manifest.labels  # unverified read
    response = client.post("/v1/predict", json={"text": "what's the weather in paris today"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"label", "request_id", "model_version", "notice"}
    assert body["label"] in labels
    assert body["label"] == "weather"
    assert body["notice"] == TERMS_NOTICE
    assert response.headers["x-terms-notice"] == TERMS_NOTICE


@pytest.mark.parametrize(
    ("content", "title_word"),
    [
        (b"{not json", "JSON"),
        (b"[1, 2]", "request"),
        (b'{"txt": "hello"}', "text"),
        (b'{"text": 5}', "text"),
        (b'{"text": "   "}', "text"),
        (b"\xff\xfe", "JSON"),
        (b"[" * 30000, "JSON"),
        (b'{"text": "\\ud800 alarm"}', "text"),
    ],
)
def test_predict_bad_body_400(client, content, title_word):
    response = client.post("/v1/predict", content=content,
                           headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.headers["content-type"].startswith(PROBLEM_TYPE)
    body = response.json()
    assert body["status"] == 400
    assert title_word in body["title"] + body["detail"]
    assert "Traceback" not in response.text


def test_predict_text_too_long_400(client):
    response = client.post("/v1/predict", json={"text": "a" * (MAX_TEXT_CHARS + 1)})
    assert response.status_code == 400
    assert "text" in response.json()["title"]


def test_predict_body_too_large_413(client):
    response = client.post("/v1/predict", content=b"x" * (MAX_BODY_BYTES + 1))
    assert response.status_code == 413
    assert response.headers["content-type"].startswith(PROBLEM_TYPE)


def test_unknown_path_404(client):
    response = client.get("/v1/unknown")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith(PROBLEM_TYPE)


def test_get_on_predict_405(client):
    response = client.get("/v1/predict")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"


def test_serves_after_bad_requests(client):
    for content in (b"{", b"null", b'{"text": []}', b"x" * (MAX_BODY_BYTES + 10)):
        client.post("/v1/predict", content=content)
    response = client.post("/v1/predict", json={"text": "set a timer for ten minutes"})
    assert response.status_code == 200
    assert response.json()["label"] == "timer"


def test_student_package_not_served(tiny_build):
    from edge_runtime.errors import TeacherUnavailable
    from edge_runtime.gateway.server import start_gateway
    from tests.conftest import SIGNER_PUBLIC

    with pytest.raises(TeacherUnavailable, match="not a teacher"):
        start_gateway(tiny_build.student_package, signer_keys=(str(SIGNER_PUBLIC),))


def test_gateway_dies_with_parent(tiny_build):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT, SIGNER_PUBLIC

    script = (
        "import sys, time\n"
        "from edge_runtime.gateway.server import start_gateway\n"
        f"g = start_gateway({str(tiny_build.teacher_package)!r}, "
        f"signer_keys=({str(SIGNER_PUBLIC)!r},))\n"
        "print(g.process.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError(f"gateway pid {child} outlived its killed parent")
