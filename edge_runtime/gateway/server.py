"""Run the gateway with uvicorn, in this process or as a child process on loopback.

``serve`` binds the socket itself so that port 0 picks a free port without a race, then prints
one line ``gateway listening on http://HOST:PORT`` to stdout, which ``launch_gateway`` reads to
find the address of the child it started.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from edge_runtime.errors import ConfigError, TeacherUnavailable
from edge_runtime.gateway.config import GatewayConfig
from edge_runtime.package import TrustPolicy, inspect_package, read_package

log = logging.getLogger(__name__)

LISTENING_PATTERN = re.compile(r"gateway listening on (http://\S+)")
DEFAULT_STARTUP_TIMEOUT = 60.0  # seconds
DEFAULT_TEACHER_PACKAGE = "models/clinc150-teacher.edgepkg"


def build_gateway(config: GatewayConfig, trust: TrustPolicy | None = None,
                  environ: Mapping[str, str] = os.environ):
    """Create the teacher backend, the rate limiter and the application that ``config``
    describes. ``trust`` verifies teacher packages; by default it trusts the config's
    ``teacher.signer_keys``."""
    from edge_runtime.gateway.app import create_app
    from edge_runtime.gateway.backends import OnnxTeacherBackend
    from edge_runtime.gateway.defences import build_defences
    from edge_runtime.gateway.observability import GatewayMetrics
    from edge_runtime.gateway.orchestrator import OpenAIToolLoopBackend
    from edge_runtime.gateway.ratelimit import create_rate_limiter

    teacher = config.teacher
    trust = trust if trust is not None else _config_trust(config)
    _warn_about_demo_secrets(config)
    if teacher.backend == "onnx":
        from edge_runtime.model import OnnxClassifier

        if not Path(teacher.package).is_file():
            raise ConfigError(
                f"{config.source}: teacher.package {teacher.package!r} is not a file; set it "
                "to a teacher package, for example models/clinc150-teacher.edgepkg, relative "
                "to the folder the gateway runs in"
            )

        # The unverified manifest gives a clear message for a student package, which is
        # encrypted for devices; the verified one below is what counts.
        _check_teacher_role(inspect_package(teacher.package)["manifest"], teacher.package)
        classifier = OnnxClassifier.from_file(teacher.package, threads=config.server.threads,
                                              trust=trust)
        manifest = classifier.package.manifest
        _check_teacher_role(manifest.raw, teacher.package)
        labels = classifier.labels
        backend = OnnxTeacherBackend(classifier)
        model_version = f"{manifest.name}@{manifest.version}"
    else:
        labels = None
        if teacher.labels_from is not None:
            labels = read_package(teacher.labels_from, trust).manifest.labels
        # The tool-loop variant can send a simulated decoy result back for a second turn.
        backend = OpenAIToolLoopBackend(
            teacher.base_url, teacher.model, api_key=teacher.read_api_key(environ),
            connect_timeout=teacher.connect_timeout, read_timeout=teacher.read_timeout,
            max_output_chars=config.limits.max_output_chars,
            max_list_items=config.limits.max_list_items, labels=labels,
            system_prompt=teacher.system_prompt,
        )
        model_version = teacher.model
    if config.rate_limit.enabled:
        limiter = create_rate_limiter(config.rate_limit.backend, config.rate_limit.redis_url)
    else:
        log.warning("rate limiting is off (--no-rate-limit, or [rate_limit] enabled = false);"
                    " use this only for load tests and evaluation on loopback")
        limiter = None
    metrics = GatewayMetrics()
    defences = build_defences(config, metrics, labels or ())
    return create_app(config, backend, limiter, model_version, metrics=metrics,
                      defences=defences)


def serve(config: GatewayConfig, trust: TrustPolicy | None = None) -> None:
    """Build the gateway from ``config`` and serve it until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigError(
            "the gateway needs the 'gateway' extra: pip install 'edge-runtime[gateway]'"
        ) from None
    from edge_runtime.gateway.observability import configure_logging

    configure_logging(config.server.log_format)
    app = build_gateway(config, trust)
    host, port = config.server.host, config.server.port

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # asyncio turns Nagle's algorithm off only on sockets whose proto is IPPROTO_TCP; with
    # proto 0, a response's headers and body went out as two segments, and the body waited
    # about 40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}; choose another host or "
                          "port (0 picks a free port)") from None
    bound_host, bound_port = sock.getsockname()[:2]
    shown_host = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host

    uvicorn_config = uvicorn.Config(
        app, log_level="warning", access_log=False, log_config=None,
        limit_concurrency=config.server.max_connections,
        timeout_graceful_shutdown=config.server.shutdown_timeout,
    )
    server = uvicorn.Server(uvicorn_config)
    print(f"gateway listening on http://{shown_host}:{bound_port}", flush=True)
    server.run(sockets=[sock])


# SHA-256 of the public example key in examples/gateway.toml, and of the demo signer's
# public key file models/keys/demo-signer.pub.pem; tests check both against the files.
EXAMPLE_KEY_HASH = "sha256:c71c53973f5ca2b9429505f85082ecb26bc15059f30b51f200aac3d6e21de782"
DEMO_SIGNER_SHA256 = "97612a057c7ec1aff0bc03001e3ce2d50016fc321140f5e8a30e3abe525c6f7d"


def _file_sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _warn_about_demo_secrets(config: GatewayConfig) -> None:
    """Log a warning for the public example API key and the public demo signer key."""
    for entry in config.keys:
        if entry.hash == EXAMPLE_KEY_HASH:
            log.warning("API key %r is the public example key from examples/gateway.toml, "
                        "which anyone can use; remove its [[keys]] entry before serving "
                        "beyond this host", entry.id)
    if config.teacher.backend == "onnx" and any(
            _file_sha256(path) == DEMO_SIGNER_SHA256 for path in config.teacher.signer_keys):
        log.warning("the teacher package is verified with the demo signer key, which is "
                    "public and protects nothing; list your own signer's key in "
                    "teacher.signer_keys for packages you build")


def _check_teacher_role(manifest: Any, path: str) -> None:
    model = manifest.get("model") if isinstance(manifest, dict) else None
    role = model.get("role") if isinstance(model, dict) else None
    if role != "teacher":
        raise ConfigError(
            f"{path} is a {role or 'unlabelled'} package, not a teacher; serve the teacher "
            "package (for example models/clinc150-teacher.edgepkg)"
        )


def _config_trust(config: GatewayConfig) -> TrustPolicy:
    from edge_runtime.keys import FileKeyProvider

    provider = FileKeyProvider(signer_public_keys=tuple(config.teacher.signer_keys))
    return TrustPolicy(trusted_keys=tuple(provider.trusted_signer_keys()),
                       allow_unsigned=config.teacher.allow_unsigned)


@dataclass
class GatewayProcess:
    """A gateway child process and the base URL it listens on."""

    process: subprocess.Popen
    url: str

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the child and wait for it; kill it if it does not exit in ``timeout``."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """Kill the child at once (SIGKILL), as a crash would."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_gateway(
    package_path: str | Path | None = DEFAULT_TEACHER_PACKAGE,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    signer_keys: tuple[str, ...] = (),
    config: str | Path | None = None,
    rate_limit: bool = False,
    env: Mapping[str, str] | None = None,
) -> GatewayProcess:
    """Start ``edge-runtime gateway`` as a child process and wait until /healthz answers.

    ``signer_keys`` are public key files the child verifies the teacher package with; without
    them it uses the config's (by default the demo key). ``config`` is a gateway TOML file;
    ``package_path`` (when not None), ``host`` and ``port`` override it. Rate limits stay off
    unless ``rate_limit`` is true, because this serves evaluation on loopback. ``env`` adds
    environment variables for the child.
    """
    command = [sys.executable, "-m", "edge_runtime", "gateway", "--host", host,
               "--port", str(port)]
    if package_path is not None:
        if not Path(package_path).is_file():
            raise ConfigError(f"teacher package not found: {package_path}")
        command += ["--package", str(package_path)]
    if config is not None:
        command += ["--config", str(config)]
    if not rate_limit:
        command.append("--no-rate-limit")
    for key in signer_keys:
        command += ["--signer-key", str(key)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=_terminate_with_parent if sys.platform == "linux" else None,
    )
    stderr_lines: list[str] = []
    threading.Thread(target=_drain, args=(process.stderr, stderr_lines), daemon=True).start()

    deadline = time.monotonic() + startup_timeout
    url = None
    assert process.stdout is not None
    for line in process.stdout:
        match = LISTENING_PATTERN.search(line)
        if match:
            url = match.group(1)
            break
    if url is None:
        process.wait(timeout=5)
        raise TeacherUnavailable(
            f"gateway exited with code {process.returncode} before listening; stderr:\n"
            + "".join(stderr_lines[-20:])
        )
    threading.Thread(target=_drain, args=(process.stdout, []), daemon=True).start()

    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                log.info("gateway ready at %s (pid %d)", url, process.pid)
                return GatewayProcess(process=process, url=url)
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.1)
    GatewayProcess(process=process, url=url).stop()
    raise TeacherUnavailable(
        f"gateway at {url} did not become healthy within {startup_timeout:.0f} s; stderr:\n"
        + "".join(stderr_lines[-20:])
    )


@contextlib.contextmanager
def running_gateway(
    package_path: str | Path | None = DEFAULT_TEACHER_PACKAGE, **kwargs
) -> Iterator[GatewayProcess]:
    """Context manager form of ``start_gateway`` that always stops the child."""
    gateway = start_gateway(package_path, **kwargs)
    try:
        yield gateway
    finally:
        gateway.stop()


def _terminate_with_parent() -> None:
    """Ask Linux to send SIGTERM to this child when its parent dies, even by SIGKILL, so that
    a killed ``eval`` or ``demo`` does not leave its gateway running."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _drain(stream, sink: list[str]) -> None:
    for line in stream:
        sink.append(line)
        if len(sink) > 200:
            del sink[:100]
