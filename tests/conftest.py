"""Shared fixtures: the real data folder, a tiny CLINC150 build, gateways and a Redis server
on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data"
CLINC150_DIR = DATA_DIR / "clinc150"
TINY_CONFIG = ROOT / "export" / "configs" / "clinc150-tiny.toml"
MODELS_DIR = ROOT / "models"
KEYS_DIR = MODELS_DIR / "keys"
SIGNER_PUBLIC = KEYS_DIR / "demo-signer.pub.pem"
SIGNER_PRIVATE = KEYS_DIR / "demo-signer.key.pem"
DEVICE_PUBLIC = KEYS_DIR / "demo-device.pub.pem"
DEVICE_PRIVATE = KEYS_DIR / "demo-device.key.pem"


def demo_trust(**kwargs):
    """A trust policy with the committed demo keys and no rollback state."""
    from edge_runtime import encryption, signing
    from edge_runtime.package import TrustPolicy

    return TrustPolicy(
        trusted_keys=(signing.load_public_key_pem(SIGNER_PUBLIC.read_bytes()),),
        device_key=encryption.load_private_key(DEVICE_PRIVATE),
        **kwargs,
    )


# Command-line options that make the CLI use the demo keys and leave the user's state alone.
CLI_TRUST = ["--signer-key", str(SIGNER_PUBLIC), "--device-key", str(DEVICE_PRIVATE),
             "--state-file", ""]


@dataclass(frozen=True)
class TinyBuild:
    dir: Path
    report: dict
    student_package: Path
    teacher_package: Path


def require_clinc150() -> None:
    if not (CLINC150_DIR / "data_full.json").is_file():
        pytest.skip(f"CLINC150 not found at {CLINC150_DIR}; the shared data folder must sit "
                    "beside the repository")


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory: pytest.TempPathFactory) -> TinyBuild:
    """The tiny CLINC150 build (8 labels, a few hundred queries), run once per test session."""
    require_clinc150()
    pytest.importorskip("torch")
    from export.build import build
    from export.config import load_config

    out = tmp_path_factory.mktemp("tiny-build")
    config = load_config(TINY_CONFIG, {
        "data.path": str(CLINC150_DIR), "output.dir": str(out), "output.models_dir": "",
        "package.signer_key": str(SIGNER_PRIVATE), "package.recipients": [str(DEVICE_PUBLIC)],
    })
    report = build(config)
    return TinyBuild(
        dir=out,
        report=report,
        student_package=out / "clinc150-tiny-student.edgepkg",
        teacher_package=out / "clinc150-tiny-teacher.edgepkg",
    )


@pytest.fixture(scope="session")
def tiny_gateway(tiny_build: TinyBuild):
    """A gateway child process serving the tiny teacher on a free loopback port."""
    from edge_runtime.gateway.server import running_gateway

    with running_gateway(tiny_build.teacher_package, signer_keys=(str(SIGNER_PUBLIC),)) as gateway:
        yield gateway


REDIS_SERVER = "/usr/bin/redis-server"


def free_loopback_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listened on when it was checked."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _redis_answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """The URL of a redis-server child process on a free loopback port, without persistence.

    Skips when redis-server is not installed, unless EDGE_RUNTIME_REQUIRE_REDIS=1, which turns
    the skip into a failure for runs that must cover the Redis backend.
    """
    executable = REDIS_SERVER if os.access(REDIS_SERVER, os.X_OK) else shutil.which("redis-server")
    if executable is None:
        reason = f"redis-server not found at {REDIS_SERVER} or on PATH; install redis-server"
        if os.environ.get("EDGE_RUNTIME_REQUIRE_REDIS") == "1":
            pytest.fail(f"{reason} (EDGE_RUNTIME_REQUIRE_REDIS=1 requires it)")
        pytest.skip(reason)

    workdir = tmp_path_factory.mktemp("redis")
    port = free_loopback_port()
    log_path = workdir / "redis.log"
    server = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir), "--logfile", str(log_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10.0
        while not _redis_answers_ping(port):
            if server.poll() is not None:
                pytest.fail(f"redis-server exited with code {server.returncode} before "
                            f"answering PING; see {log_path}")
            if time.monotonic() > deadline:
                pytest.fail(f"redis-server on port {port} did not answer PING within 10 s; "
                            f"see {log_path}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
