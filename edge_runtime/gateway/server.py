"""Run the gateway with uvicorn, in this process or as a child process on loopback.

``serve`` binds the socket itself so that port 0 picks a free port without a race, then prints
one line ``gateway listening on http://HOST:PORT`` to stdout, which ``launch_gateway`` reads to
find the address of the child it started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from edge_runtime.errors import ConfigError, TeacherUnavailable
from edge_runtime.package import TrustPolicy

log = logging.getLogger(__name__)

LISTENING_PATTERN = re.compile(r"gateway listening on (http://\S+)")
DEFAULT_STARTUP_TIMEOUT = 60.0  # seconds
DEFAULT_TEACHER_PACKAGE = "models/clinc150-teacher.edgepkg"


def serve(package_path: str, host: str = "127.0.0.1", port: int = 8080, threads: int = 1,
          trust: TrustPolicy | None = None) -> None:
    """Verify and load the teacher package, then serve it until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigError(
            "the gateway needs the 'gateway' extra: pip install 'edge-runtime[gateway]'"
        ) from None
    from edge_runtime.gateway.app import create_app
    from edge_runtime.model import OnnxClassifier

    teacher = OnnxClassifier.from_file(package_path, threads=threads,
                                       trust=trust if trust is not None else TrustPolicy())
    role = teacher.package.manifest.raw.get("model", {}).get("role")
    if role != "teacher":
        raise ConfigError(
            f"{package_path} is a {role or 'unlabelled'} package, not a teacher; serve the "
            "teacher package (for example models/clinc150-teacher.edgepkg)"
        )
    app = create_app(teacher)

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
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}; choose another --host or "
                          "--port (0 picks a free port)") from None
    bound_host, bound_port = sock.getsockname()[:2]
    shown_host = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host

    config = uvicorn.Config(app, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    print(f"gateway listening on http://{shown_host}:{bound_port}", flush=True)
    server.run(sockets=[sock])


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
    package_path: str | Path = DEFAULT_TEACHER_PACKAGE,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    signer_keys: tuple[str, ...] = (),
) -> GatewayProcess:
    """Start ``edge-runtime gateway`` as a child process and wait until /healthz answers.

    ``signer_keys`` are public key files the child verifies the teacher package with; without
    them it uses its defaults (EDGE_RUNTIME_SIGNER_KEY, then the demo key).
    """
    if not Path(package_path).is_file():
        raise ConfigError(f"teacher package not found: {package_path}")
    command = [
        sys.executable, "-m", "edge_runtime", "gateway",
        "--package", str(package_path), "--host", host, "--port", str(port),
    ]
    for key in signer_keys:
        command += ["--signer-key", str(key)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
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
    package_path: str | Path = DEFAULT_TEACHER_PACKAGE, **kwargs
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
