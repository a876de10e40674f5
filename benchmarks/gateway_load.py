"""Requests per second and latency of the teacher gateway under concurrent load, with rate
limiting and output limiting on and off in one run.

    python benchmarks/gateway_load.py [--concurrency 1,4,16,64] [--duration 7] [--rounds 2]
        [--warmup 0.5] [--configs rl-off,rl-memory,rl-redis,out-on,out-off]
        [--client raw|httpx] [--data ../shared/data/clinc150] [--json FILE]

Every server runs on 127.0.0.1 and is started and stopped by this script:

- one gateway child process per configuration (``edge-runtime gateway --config FILE`` through
  ``start_gateway``), all started before the first measurement;
- for ``out-on`` and ``out-off``, the fake OpenAI-compatible server of
  ``edge_runtime.gateway.fake_openai`` in its own child process, so that it shares neither an
  event loop nor the GIL with the load generator;
- for ``rl-redis``, a ``redis-server`` child with persistence off.

The load generator is this process: one asyncio event loop running N workers. Each worker
uses one keep-alive HTTP/1.1 connection and sends ``POST /v1/predict`` requests back to back,
with queries from the CLINC150 test split, shuffled with a fixed seed. Worker w starts at
position w * len(queries) / N of that list, so every configuration at the same concurrency
gets the same queries in the same order. ``--client raw``, the default, writes the requests
and parses the responses on asyncio streams. ``--client httpx`` uses one ``httpx.AsyncClient``,
which spent 2.4 to 15.6 ms of CPU per request at 1 to 64 workers on a 2-core x86 VM, more than
the gateway itself, against about 0.2 ms for the raw client.

Configurations:

- ``rl-off``: onnx teacher (models/clinc150-teacher.edgepkg), ``[rate_limit] enabled = false``
  and no API keys.
- ``rl-memory``: the same teacher with the memory rate limiter and one API key per worker.
  The config lists max(--concurrency) keys at every level, so a key lookup costs the same
  everywhere. The per-address and per-key limits are so high that no request is rejected, so
  the difference to ``rl-off`` is the cost of checking the key and the two limits.
- ``rl-redis``: as ``rl-memory`` with the Redis backend. It is skipped when no redis-server
  binary is found.
- ``out-on``: the openai teacher backend against the fake server, which returns a fixed
  reply with a 200-item list and about 3,000 characters after it. ``max_output_chars`` and
  ``max_list_items`` keep their defaults, so the gateway cuts the reply. Rate limiting is off.
- ``out-off``: as ``out-on`` with both limits at MAX_RESPONSE_BYTES, which no reply text can
  exceed, so nothing is cut. The gateway still runs ``limit_output`` over the reply, because
  no setting skips it. It sends the whole reply, about 10 times the bytes of ``out-on``.

Each (configuration, concurrency) cell runs ``--rounds`` times for ``--duration / --rounds``
seconds after ``--warmup`` seconds of unmeasured requests on the same connections. Concurrency
levels run in order, and within a level the configurations take turns, in reverse order every
other round, so that a change in machine load hits them alike. A request counts when its
response ends inside the measured window; requests/s counts responses with status 200. Latency
runs from writing the request to reading the last byte of the response, so at high
concurrency it includes the time a response waits for the client's event loop.

CPU time per request comes from ``time.process_time`` of this process (the load generator,
with the threads that drain the gateways' stderr) and from ``/proc/PID/stat`` of the gateway
and, where used, of the fake server or redis-server, over the measured window. It is left out
where /proc is missing.

NOTE: the load generator and the servers share the machine's cores, so the numbers are not
those of a gateway on a dedicated host. The client's CPU per request shows what it took.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from edge_runtime.bench import this_cpu  # noqa: E402
from edge_runtime.data import load_split  # noqa: E402
from edge_runtime.gateway.backends import MAX_RESPONSE_BYTES, limit_output  # noqa: E402
from edge_runtime.gateway.config import LimitsConfig  # noqa: E402
from edge_runtime.gateway.keys import generate_api_key, hash_api_key  # noqa: E402
from edge_runtime.gateway.server import GatewayProcess, start_gateway  # noqa: E402

PREDICT_PATH = "/v1/predict"
FAKE_MODEL = "fake-chat"
# Limits of the rate-limited configurations: a tenth of the maximum rate that
# RateLimitPolicy accepts (10**6 per second) and a one-second bucket, far above the throughput
# of one gateway process, so that no request is rejected. A 429 response fails the run.
UNREACHED_RATE = 100_000.0  # requests per second
UNREACHED_BURST = 100_000  # requests
# Output limits of out-off. The gateway reads at most MAX_RESPONSE_BYTES of a completion, so
# its reply text has fewer characters and fewer list items than this.
UNCUT_OUTPUT_LIMIT = MAX_RESPONSE_BYTES
DEFAULT_LIMITS = LimitsConfig()
STOP_TIMEOUT = 10.0  # seconds to wait for a child process to exit before killing it
STARTUP_TIMEOUT = 60.0  # seconds for a child server to start listening
ERROR_PAUSE = 0.01  # seconds a worker waits after a failed request before the next one
VALIDATION_QUERY = "how do i set up direct deposit for my paycheck"
CLIENT_NAMES = {"raw": "asyncio-stream (hand-written HTTP/1.1)", "httpx": "httpx.AsyncClient"}


@dataclass(frozen=True)
class LoadConfig:
    """One gateway configuration under test."""

    name: str
    description: str
    teacher: str  # "onnx" (the teacher package) or "openai" (the fake server)
    rate_limiter: str | None  # None (rate limiting off), "memory" or "redis"
    cut_output: bool = True  # False raises the output limits so that nothing is cut


CONFIGS = {
    config.name: config for config in (
        LoadConfig("rl-off", "onnx teacher, rate limiting off, no API keys", "onnx", None),
        LoadConfig("rl-memory", "onnx teacher, API keys + memory rate limiter", "onnx",
                   "memory"),
        LoadConfig("rl-redis", "onnx teacher, API keys + Redis rate limiter", "onnx", "redis"),
        LoadConfig("out-on", "fake OpenAI teacher, default output limits", "openai", None),
        LoadConfig("out-off", "fake OpenAI teacher, output limits raised, nothing cut",
                   "openai", None, cut_output=False),
    )
}
# (label, configuration with the feature on, configuration with it off)
COMPARISONS = (
    ("rate limiting, memory", "rl-memory", "rl-off"),
    ("rate limiting, Redis", "rl-redis", "rl-off"),
    ("output limiting", "out-on", "out-off"),
)


def build_fake_reply() -> str:
    """Return the fixed reply of the fake server: an introduction, a 200-item bulleted list
    and about 3,000 characters of closing paragraphs, so that the default limits cut both the
    list (to 10 items) and the text (to 2,000 characters)."""
    subjects = ("router", "modem", "account", "password", "invoice", "calendar", "printer",
                "backup", "firewall", "browser")
    lines = ["Here is a checklist for the request, one step per line, in the order that "
             "usually resolves it fastest.", ""]
    for number in range(1, 201):
        subject = subjects[number % len(subjects)]
        lines.append(f"- Step {number}: check the {subject} settings and note what changed "
                     "since the last time it worked.")
    lines.append("")
    paragraph = ("If a step does not apply, skip it and continue with the next one. Keep "
                 "notes of every change so that it can be undone, and restart the device "
                 "after each group of ten steps before testing again. ")
    for _ in range(15):
        lines.append(paragraph.strip())
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# Child processes


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago.

    NOTE: another process may take the port before the caller binds it. Only redis-server
    gets its port this way, because it cannot report a port it picked itself.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def exit_with_parent() -> None:
    """Have Linux send SIGTERM to this child when the benchmark dies, even by SIGKILL."""
    import ctypes

    set_parent_death_signal = 1  # PR_SET_PDEATHSIG from <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(set_parent_death_signal, signal.SIGTERM)


def child_preexec():
    return exit_with_parent if sys.platform == "linux" else None


def stop_process(process: subprocess.Popen) -> None:
    """Terminate a child, and kill it if it has not exited within STOP_TIMEOUT seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def child_env() -> dict[str, str]:
    """Return the environment for Python children, with this repository on the module path."""
    paths = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


# The fake server runs in a child process of its own. It prints its base URL and serves until
# its stdin closes, which also happens when the benchmark dies.
FAKE_SERVER_LAUNCHER = """\
import sys
from edge_runtime.gateway.fake_openai import FakeOpenAIServer
with open(sys.argv[1], encoding="utf-8") as reply_file:
    reply = reply_file.read()
with FakeOpenAIServer(content=reply, model=sys.argv[2]) as server:
    print(server.base_url, flush=True)
    sys.stdin.read()
"""


@dataclass
class FakeServerProcess:
    """The fake OpenAI-compatible server's child process and its base URL."""

    process: subprocess.Popen
    base_url: str

    def stop(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            stop_process(self.process)


def start_fake_server(reply: str, scratch: Path) -> FakeServerProcess:
    """Start the fake server in a child process and wait for its base URL."""
    reply_file = scratch / "fake-reply.txt"
    reply_file.write_text(reply, encoding="utf-8")
    log_file = (scratch / "fake-server.log").open("w", encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-c", FAKE_SERVER_LAUNCHER, str(reply_file), FAKE_MODEL],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True,
        env=child_env(), cwd=REPO_ROOT, preexec_fn=child_preexec(),
    )
    log_file.close()
    # The fake server gives up after its own 10 s startup timeout and exits, which ends this
    # readline with an empty line.
    line = process.stdout.readline().strip()
    if not line.startswith("http://127.0.0.1:"):
        stop_process(process)
        log_text = (scratch / "fake-server.log").read_text(encoding="utf-8")[-2000:]
        raise RuntimeError(f"the fake OpenAI server did not start (exit code "
                           f"{process.returncode}); its stderr:\n{log_text}")
    return FakeServerProcess(process=process, base_url=line)


def start_redis(binary: str, scratch: Path) -> tuple[subprocess.Popen, str]:
    """Start redis-server on a free loopback port without persistence; return it and its URL."""
    port = free_port()
    log_path = scratch / "redis.log"
    with log_path.open("w", encoding="utf-8") as log_file:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(scratch)],
            stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=child_preexec(),
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as connection:
                connection.sendall(b"PING\r\n")
                if connection.recv(64).startswith(b"+PONG"):
                    return process, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        time.sleep(0.05)
    stop_process(process)
    raise RuntimeError(f"redis-server did not reply to PING on 127.0.0.1:{port} within "
                       f"{STARTUP_TIMEOUT:.0f} s; its log:\n"
                       + log_path.read_text(encoding="utf-8")[-2000:])


def toml_string(value: str) -> str:
    # A JSON string with only printable ASCII is also a valid TOML basic string.
    return json.dumps(value, ensure_ascii=True)


def gateway_config_toml(config: LoadConfig, *, package: Path, signer_key: Path,
                        fake_url: str | None, redis_url: str | None,
                        key_hashes: list[str], threads: int) -> str:
    """Write the gateway TOML for one configuration; every path in it is absolute."""
    lines = ["[server]", 'host = "127.0.0.1"', "port = 0", f"threads = {threads}", "",
             "[teacher]"]
    if config.teacher == "onnx":
        lines += [f"package = {toml_string(str(package))}",
                  f"signer_keys = [{toml_string(str(signer_key))}]"]
    else:
        lines += ['backend = "openai"', f"base_url = {toml_string(fake_url)}",
                  f"model = {toml_string(FAKE_MODEL)}"]
    if not config.cut_output:
        lines += ["", "[limits]", f"max_output_chars = {UNCUT_OUTPUT_LIMIT}",
                  f"max_list_items = {UNCUT_OUTPUT_LIMIT}"]

    lines += ["", "[rate_limit]"]
    if config.rate_limiter is None:
        lines.append("enabled = false")
        return "\n".join(lines) + "\n"
    lines += [f"backend = {toml_string(config.rate_limiter)}",
              f"per_address = {{ rate = {UNREACHED_RATE}, burst = {UNREACHED_BURST} }}"]
    if config.rate_limiter == "redis":
        lines.append(f"redis_url = {toml_string(redis_url)}")
    lines += ["", "[tiers.load]", f"rate = {UNREACHED_RATE}", f"burst = {UNREACHED_BURST}"]
    for index, key_hash in enumerate(key_hashes):
        lines += ["", "[[keys]]", f'id = "load-{index}"', f"hash = {toml_string(key_hash)}",
                  'tenant = "load-test"', 'tier = "load"']
    return "\n".join(lines) + "\n"


def cpu_seconds(pid: int) -> float | None:
    """Return the user plus system CPU seconds of a process from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat_file:
            stat = stat_file.read()
    except OSError:
        return None
    # The command name in brackets may contain spaces, so the fields are counted after it.
    fields = stat[stat.rindex(")") + 2:].split()
    user_ticks, system_ticks = int(fields[11]), int(fields[12])  # utime, stime
    return (user_ticks + system_ticks) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float | None:
    """Return the CPU seconds that all CPUs have spent busy since boot, from /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as stat_file:
            fields = stat_file.readline().split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...; idle and iowait are not busy.
    user, nice, system, _, _, irq, softirq, steal = (int(value) for value in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# The load generator


class UnsupportedResponse(Exception):
    """A response that the raw client cannot read, such as one without Content-Length."""


def parse_response_head(head: bytes) -> tuple[int, int, bool]:
    """Return the status, the Content-Length and whether the server closes the connection."""
    status_line, *header_lines = head[:-4].split(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise UnsupportedResponse(f"invalid status line {status_line[:80]!r}")
    status = int(parts[1])
    length = None
    closes = False
    for line in header_lines:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            closes = value.strip().lower() == b"close"
        elif name == b"transfer-encoding":
            raise UnsupportedResponse("chunked response; the raw client reads only bodies "
                                      "with Content-Length, so use --client httpx")
    if length is None:
        raise UnsupportedResponse("response without Content-Length")
    return status, length, closes


@dataclass
class CellTally:
    """Responses that the workers of one cell record inside the measured window, and the errors
    during the warm-up."""

    window_start: float  # time.perf_counter() seconds
    window_end: float
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)  # inside the window
    warmup_errors: Counter = field(default_factory=Counter)
    response_bytes: int = 0  # bodies of 200 responses inside the window

    def record(self, started: float, finished: float, outcome: str, body_bytes: int) -> None:
        if finished < self.window_start:
            if outcome != "200":
                self.warmup_errors[outcome] += 1
            return
        if finished > self.window_end:
            return
        self.statuses[outcome] += 1
        if outcome == "200":
            self.latencies_ms.append((finished - started) * 1000.0)
            self.response_bytes += body_bytes


@dataclass(frozen=True)
class Workload:
    """The requests of one configuration: pre-encoded bodies and one API key per worker."""

    host: str
    port: int
    bodies: list[bytes]  # JSON request bodies, in the order the workers cycle through
    api_keys: list[str]  # empty when the gateway has no keys
    answer_prefix: bytes  # how the body of a correct 200 response starts

    def offset(self, worker: int, concurrency: int) -> int:
        return worker * len(self.bodies) // concurrency


async def raw_worker(workload: Workload, worker: int, concurrency: int, tally: CellTally,
                     max_requests: int) -> None:
    """Send requests back to back on one connection with hand-written HTTP/1.1."""
    header = (f"POST {PREDICT_PATH} HTTP/1.1\r\nHost: {workload.host}:{workload.port}\r\n"
              "Content-Type: application/json\r\n")
    if workload.api_keys:
        header += f"Authorization: Bearer {workload.api_keys[worker]}\r\n"
    header_bytes = header.encode("ascii")
    first = workload.offset(worker, concurrency)
    reader = writer = None
    try:
        for sequence in range(max_requests):
            if time.perf_counter() >= tally.window_end:
                break
            started = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(workload.host, workload.port)
                body = workload.bodies[(first + sequence) % len(workload.bodies)]
                # One write per request, so that the request leaves in one TCP segment.
                writer.write(header_bytes + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                head = await reader.readuntil(b"\r\n\r\n")
                status, length, closes = parse_response_head(head)
                body = await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    UnsupportedResponse, ValueError) as exc:
                tally.record(started, time.perf_counter(), f"client {type(exc).__name__}", 0)
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(ERROR_PAUSE)
                continue
            finished = time.perf_counter()
            outcome = str(status)
            if status == 200 and not body.startswith(workload.answer_prefix):
                outcome = "200 without an answer"
            tally.record(started, finished, outcome, len(body))
            if closes:
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()


async def httpx_worker(client: httpx.AsyncClient, workload: Workload, worker: int,
                       concurrency: int, tally: CellTally, max_requests: int) -> None:
    """Send requests back to back through a shared httpx.AsyncClient."""
    headers = {"Content-Type": "application/json"}
    if workload.api_keys:
        headers["Authorization"] = f"Bearer {workload.api_keys[worker]}"
    first = workload.offset(worker, concurrency)
    for sequence in range(max_requests):
        if time.perf_counter() >= tally.window_end:
            break
        body = workload.bodies[(first + sequence) % len(workload.bodies)]
        started = time.perf_counter()
        try:
            response = await client.post(PREDICT_PATH, content=body, headers=headers)
        except httpx.HTTPError as exc:
            tally.record(started, time.perf_counter(), f"client {type(exc).__name__}", 0)
            await asyncio.sleep(ERROR_PAUSE)
            continue
        finished = time.perf_counter()
        outcome = str(response.status_code)
        if response.status_code == 200 and not response.content.startswith(
                workload.answer_prefix):
            outcome = "200 without an answer"
        tally.record(started, finished, outcome, len(response.content))


@dataclass
class CellResult:
    """The tally of one run of one cell, its window length and the CPU seconds in the window."""

    tally: CellTally
    window_seconds: float
    client_cpu: float | None = None
    server_cpu: float | None = None
    other_cpu: float | None = None  # busy CPU seconds of all other processes and the kernel
    timed_out: int = 0  # workers cancelled at the cell's deadline


async def run_cell(workload: Workload, concurrency: int, warmup: float, duration: float,
                   client_kind: str, server_pids: list[int], request_timeout: float,
                   max_requests: int) -> CellResult:
    """Run ``concurrency`` workers for ``warmup + duration`` seconds and tally the window."""
    now = time.perf_counter()
    tally = CellTally(window_start=now + warmup, window_end=now + warmup + duration)
    result = CellResult(tally=tally, window_seconds=duration)
    snapshots: dict[str, tuple[float, list[float | None], float | None]] = {}

    async def sample_cpu() -> None:
        for name, moment in (("start", tally.window_start), ("end", tally.window_end)):
            await asyncio.sleep(max(0.0, moment - time.perf_counter()))
            snapshots[name] = (time.process_time(), [cpu_seconds(pid) for pid in server_pids],
                               machine_busy_seconds())

    client = None
    if client_kind == "httpx":
        transport = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=concurrency,
                                max_keepalive_connections=concurrency),
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        client = httpx.AsyncClient(base_url=f"http://{workload.host}:{workload.port}",
                                   transport=transport, timeout=request_timeout)
    try:
        if client is None:
            workers = [raw_worker(workload, index, concurrency, tally, max_requests)
                       for index in range(concurrency)]
        else:
            workers = [httpx_worker(client, workload, index, concurrency, tally, max_requests)
                       for index in range(concurrency)]
        tasks = [asyncio.ensure_future(worker) for worker in [*workers, sample_cpu()]]
        # Each worker stops issuing requests at the window's end; this deadline bounds the
        # wait for the requests still in flight.
        done, pending = await asyncio.wait(tasks, timeout=warmup + duration + request_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        result.timed_out = len(pending)
        for task in done:
            task.result()  # a worker's unexpected exception is a bug in this script
    finally:
        if client is not None:
            await client.aclose()

    if "start" in snapshots and "end" in snapshots:
        client_start, servers_start, busy_start = snapshots["start"]
        client_end, servers_end, busy_end = snapshots["end"]
        result.client_cpu = client_end - client_start
        if None not in servers_start and None not in servers_end:
            result.server_cpu = sum(servers_end) - sum(servers_start)
            if busy_start is not None and busy_end is not None:
                result.other_cpu = max(0.0, busy_end - busy_start - result.client_cpu
                                       - result.server_cpu)
    return result


# Checks before the load


def check_config(name: str, url: str, workload: Workload, reply: str) -> dict:
    """Send one request and check that the gateway behaves as configuration ``name`` claims.

    Raises RuntimeError naming the configuration when it does not.
    """
    config = CONFIGS[name]
    headers = {"Content-Type": "application/json"}
    if workload.api_keys:
        headers["Authorization"] = f"Bearer {workload.api_keys[0]}"
    body = json.dumps({"text": VALIDATION_QUERY}).encode("utf-8")
    response = httpx.post(url + PREDICT_PATH, content=body, headers=headers, timeout=30.0)
    if response.status_code != 200:
        raise RuntimeError(f"{name}: the check request returned HTTP {response.status_code}: "
                           f"{response.text[:300]}")
    answer = response.json()
    limited = "ratelimit" in response.headers
    if limited != (config.rate_limiter is not None):
        raise RuntimeError(f"{name}: RateLimit header {'present' if limited else 'missing'}, "
                           f"but the rate limiter is {config.rate_limiter or 'off'}")
    check = {"status": response.status_code, "rate_limit_header": response.headers.get(
        "ratelimit")}
    if config.teacher == "onnx":
        if "label" not in answer:
            raise RuntimeError(f"{name}: the response body has no 'label' field: {sorted(answer)}")
        check["label"] = answer["label"]
        return check

    text = answer.get("text")
    if not isinstance(text, str):
        raise RuntimeError(f"{name}: the response body has no 'text' field: {sorted(answer)}")
    items = sum(1 for line in text.splitlines() if line.startswith("- "))
    check.update(text_chars=len(text), list_items=items)
    if config.cut_output:
        if (len(text) > DEFAULT_LIMITS.max_output_chars
                or items > DEFAULT_LIMITS.max_list_items or text == reply):
            raise RuntimeError(f"{name}: the reply was not cut to the default limits "
                               f"({len(text)} characters, {items} list items)")
    elif text != reply:
        raise RuntimeError(f"{name}: the reply was changed ({len(text)} of {len(reply)} "
                           "characters), but the output limits should cut nothing")
    return check


def time_limit_output(reply: str, repeats: int = 200) -> dict[str, float]:
    """Return the median microseconds of ``limit_output`` on the fake reply, in this process,
    with the default limits and with the limits of out-off."""
    limits = {"out-on": (DEFAULT_LIMITS.max_output_chars, DEFAULT_LIMITS.max_list_items),
              "out-off": (UNCUT_OUTPUT_LIMIT, UNCUT_OUTPUT_LIMIT)}
    medians = {}
    for name, (max_chars, max_items) in limits.items():
        timings = []
        for _ in range(repeats):
            started = time.perf_counter()
            limit_output(reply, max_chars, max_items)
            timings.append((time.perf_counter() - started) * 1e6)
        medians[name] = float(np.median(timings))
    return medians


# Report


def summarize_cell(runs: list[CellResult]) -> dict:
    """Combine the rounds of one cell into its figures."""
    latencies = np.asarray([value for run in runs for value in run.tally.latencies_ms])
    statuses = Counter()
    warmup_errors = Counter()
    for run in runs:
        statuses.update(run.tally.statuses)
        warmup_errors.update(run.tally.warmup_errors)
    ok = statuses.get("200", 0)
    window = sum(run.window_seconds for run in runs)
    errors = {status: count for status, count in statuses.items() if status != "200"}
    for status, count in warmup_errors.items():
        errors[f"{status} (warm-up)"] = count
    timed_out = sum(run.timed_out for run in runs)
    if timed_out:
        errors["timed out"] = timed_out

    def per_request_ms(values: list[float | None]) -> float | None:
        if not ok or any(value is None for value in values):
            return None
        return sum(values) / ok * 1000.0

    other = [run.other_cpu for run in runs]
    percentiles = np.percentile(latencies, [50, 90, 99]) if ok else [None] * 3
    return {
        "requests": ok,
        "errors": errors,
        "window_seconds": window,
        "requests_per_second": ok / window,
        "p50_ms": None if not ok else float(percentiles[0]),
        "p90_ms": None if not ok else float(percentiles[1]),
        "p99_ms": None if not ok else float(percentiles[2]),
        "max_ms": None if not ok else float(latencies.max()),
        "mean_response_bytes": None if not ok else sum(
            run.tally.response_bytes for run in runs) / ok,
        "client_cpu_ms_per_request": per_request_ms([run.client_cpu for run in runs]),
        "server_cpu_ms_per_request": per_request_ms([run.server_cpu for run in runs]),
        # Cores that other processes and kernel threads kept busy during the window, on
        # average. The idle gateways of the other configurations count here too.
        "other_cpu_cores": None if None in other else sum(other) / window,
    }


def compute_ratios(cells: dict[str, dict[int, dict]], levels: list[int]) -> list[dict]:
    ratios = []
    for label, on, off in COMPARISONS:
        if on not in cells or off not in cells:
            continue
        for level in levels:
            on_cell, off_cell = cells[on][level], cells[off][level]
            rps_ratio = (on_cell["requests_per_second"] / off_cell["requests_per_second"]
                         if off_cell["requests_per_second"] else None)
            p50_ratio = (on_cell["p50_ms"] / off_cell["p50_ms"]
                         if on_cell["p50_ms"] and off_cell["p50_ms"] else None)
            ratios.append({"comparison": label, "on": on, "off": off, "concurrency": level,
                           "requests_per_second_ratio": rps_ratio, "p50_ratio": p50_ratio})
    return ratios


def format_number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_errors(errors: dict[str, int]) -> str:
    if not errors:
        return "0"
    return ", ".join(f"{count} x {status}" for status, count in sorted(errors.items()))


def format_markdown(report: dict) -> str:
    settings, machine = report["settings"], report["machine"]
    lines = [
        f"Gateway under load: {CLIENT_NAMES[settings['client']]} client, "
        f"{settings['duration']:g} s measured per cell in {settings['rounds']} round(s), each "
        f"after {settings['warmup']:g} s of warm-up; {machine['cpu']}, "
        f"{machine['logical_cpus']} logical CPUs shared by the gateway and the load generator",
        "",
        "| configuration | workers | requests | errors | req/s | p50 ms | p99 ms | "
        "client CPU ms/req | server CPU ms/req |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, by_level in report["cells"].items():
        for level, cell in by_level.items():
            lines.append(
                f"| {name} | {level} | {cell['requests']} | {format_errors(cell['errors'])} | "
                f"{cell['requests_per_second']:.1f} | {format_number(cell['p50_ms'], 2)} | "
                f"{format_number(cell['p99_ms'], 2)} | "
                f"{format_number(cell['client_cpu_ms_per_request'], 3)} | "
                f"{format_number(cell['server_cpu_ms_per_request'], 3)} |")
    if report["ratios"]:
        lines += ["", "| comparison (on / off) | workers | req/s ratio | p50 ratio |",
                  "|---|---:|---:|---:|"]
    for ratio in report["ratios"]:
        lines.append(
            f"| {ratio['comparison']} ({ratio['on']} / {ratio['off']}) | "
            f"{ratio['concurrency']} | {format_number(ratio['requests_per_second_ratio'], 3)} | "
            f"{format_number(ratio['p50_ratio'], 3)} |")
    lines.append("")
    lines += [f"- {note}" for note in format_notes(report)]
    return "\n".join(lines)


def format_notes(report: dict) -> list[str]:
    """Return the lines printed below the tables: output-limit costs, CPU and run time."""
    notes = []
    timings = report.get("limit_output_us")
    if timings:
        notes.append(f"limit_output on the fake reply in this process, median: "
                     f"{timings['out-on']:.1f} us with the default limits, "
                     f"{timings['out-off']:.1f} us with the limits of out-off")
    sizes = {name: by_level[max(by_level)]["mean_response_bytes"]
             for name, by_level in report["cells"].items() if name.startswith("out-")}
    if sizes:
        notes.append("mean response body: " + ", ".join(
            f"{name} {format_number(size, 0)} bytes" for name, size in sizes.items()))
    other = [(cell["other_cpu_cores"], name, level)
             for name, by_level in report["cells"].items() for level, cell in by_level.items()
             if cell["other_cpu_cores"] is not None]
    if other:
        busiest = max(other)
        notes.append(f"CPU used by other processes during the windows: mean "
                     f"{sum(value for value, _, _ in other) / len(other):.2f} cores, max "
                     f"{busiest[0]:.2f} ({busiest[1]}, {busiest[2]} workers)")
    notes.append(f"run time {report['total_seconds']:.0f} s, of which "
                 f"{report['startup_seconds']:.0f} s starting and checking the servers")
    return notes


def machine_info(redis_binary: str | None) -> dict:
    cpu = this_cpu()["cpu_model"]
    versions = {}
    for package in ("onnxruntime", "httpx", "uvicorn", "starlette", "redis"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    if redis_binary:
        completed = subprocess.run([redis_binary, "--version"], capture_output=True, text=True,
                                   timeout=10)
        versions["redis-server"] = completed.stdout.strip()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions}


# Main


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid concurrency list {text!r}; pass integers separated by commas, "
            "for example 1,4,16,64") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(
            f"invalid concurrency list {text!r}; every level must be at least 1")
    return levels


def parse_configs(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown configuration(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(CONFIGS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] + " " +
                                     __doc__.splitlines()[1])
    parser.add_argument("--concurrency", type=parse_levels, default=parse_levels("1,4,16,64"),
                        help="concurrent workers (connections) per cell, comma-separated "
                             "(default: 1,4,16,64)")
    parser.add_argument("--duration", type=float, default=7.0,
                        help="measured seconds per configuration and concurrency, split over "
                             "the rounds (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="times each cell runs, taking turns with the other "
                             "configurations (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="unmeasured seconds at the start of each cell run "
                             "(default: %(default)s)")
    parser.add_argument("--configs", type=parse_configs, default=list(CONFIGS),
                        help=f"configurations to run, comma-separated (default: all: "
                             f"{','.join(CONFIGS)})")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw",
                        help="load generator: hand-written HTTP/1.1 on asyncio streams, or "
                             "httpx.AsyncClient (default: %(default)s)")
    parser.add_argument("--data", default="../shared/data/clinc150",
                        help="data set whose test split supplies the queries "
                             "(default: %(default)s)")
    parser.add_argument("--package", default="models/clinc150-teacher.edgepkg",
                        help="signed teacher package for the onnx configurations "
                             "(default: %(default)s)")
    parser.add_argument("--signer-key", default="models/keys/demo-signer.pub.pem",
                        help="public key PEM that verifies --package (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads of the onnx teacher "
                             "(default: %(default)s)")
    parser.add_argument("--redis-server", default=shutil.which("redis-server"),
                        help="redis-server binary for rl-redis; without one, rl-redis is "
                             "skipped (default: %(default)s)")
    parser.add_argument("--request-timeout", type=float, default=10.0,
                        help="seconds a cell waits for its last requests after the window "
                             "(default: %(default)s)")
    parser.add_argument("--max-requests", type=int, default=1_000_000,
                        help="maximum requests per worker and cell run (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("duration", "warmup", "request_timeout"):
        value = getattr(args, name)
        if not 0 <= value < 3600 or (name != "warmup" and value == 0):
            parser.error(f"--{name.replace('_', '-')} is {value}; pass a number of seconds "
                         "above 0 and below 3600")
    for name in ("rounds", "threads", "max_requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} is {getattr(args, name)}; pass 1 or more")

    configs = list(args.configs)
    if "rl-redis" in configs and not args.redis_server:
        print("note: no redis-server binary found, so rl-redis is skipped; pass "
              "--redis-server PATH to include it", file=sys.stderr)
        configs.remove("rl-redis")
    if not configs:
        parser.error("no configuration left to run")
    package, signer_key = Path(args.package).resolve(), Path(args.signer_key).resolve()
    if any(CONFIGS[name].teacher == "onnx" for name in configs):
        missing = [str(path) for path in (package, signer_key) if not path.is_file()]
        if missing:
            print(f"error: file not found: {', '.join(missing)}; pass --package and "
                  "--signer-key, or build the models with `make models`", file=sys.stderr)
            return 2
    try:
        texts = [example.text for example in load_split(args.data, "test")]
    except FileNotFoundError as exc:
        print(f"error: {exc}; pass --data with the CLINC150 folder", file=sys.stderr)
        return 2
    random.Random(0).shuffle(texts)
    bodies = [json.dumps({"text": text}).encode("utf-8") for text in texts]
    reply = build_fake_reply()

    with tempfile.TemporaryDirectory(prefix="gateway-load-") as scratch_name:
        scratch = Path(scratch_name)
        report = run_benchmark(args, configs, package, signer_key, bodies, reply, scratch)
    report["queries"] = {"split": "test", "count": len(texts), "data": args.data}
    print(format_markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)

    failed = {name: {level: cell["errors"] for level, cell in by_level.items() if cell["errors"]}
              for name, by_level in report["cells"].items()}
    failed = {name: levels for name, levels in failed.items() if levels}
    if failed:
        rejected = any("429" in status for levels in failed.values()
                       for errors in levels.values() for status in errors)
        print(f"error: requests failed: {json.dumps(failed)}"
              + ("; a rate limit rejected requests, so the limits in this script are too low "
                 "for this machine" if rejected else ""), file=sys.stderr)
        return 1
    return 0


def run_benchmark(args: argparse.Namespace, configs: list[str], package: Path,
                  signer_key: Path, bodies: list[bytes], reply: str, scratch: Path) -> dict:
    """Start the servers, check each configuration, run every cell and stop the servers."""
    levels = args.concurrency
    api_keys = [generate_api_key() for _ in range(max(levels))]
    key_hashes = [hash_api_key(key) for key in api_keys]
    children: list[subprocess.Popen] = []
    gateways: dict[str, GatewayProcess] = {}
    fake_server = None
    load_before = os.getloadavg()
    started = time.perf_counter()
    try:
        fake_url = redis_url = None
        extra_pids: dict[str, list[int]] = {"openai": [], "redis": []}
        if any(CONFIGS[name].teacher == "openai" for name in configs):
            fake_server = start_fake_server(reply, scratch)
            fake_url = fake_server.base_url
            extra_pids["openai"].append(fake_server.process.pid)
        if "rl-redis" in configs:
            redis_process, redis_url = start_redis(args.redis_server, scratch)
            children.append(redis_process)
            extra_pids["redis"].append(redis_process.pid)

        workloads: dict[str, Workload] = {}
        server_pids: dict[str, list[int]] = {}
        checks = {}
        for name in configs:
            config = CONFIGS[name]
            config_path = scratch / f"{name}.toml"
            config_path.write_text(gateway_config_toml(
                config, package=package, signer_key=signer_key, fake_url=fake_url,
                redis_url=redis_url, key_hashes=key_hashes if config.rate_limiter else [],
                threads=args.threads), encoding="utf-8")
            print(f"starting the {name} gateway ...", file=sys.stderr)
            # rate_limit=True leaves the limiter as the config file sets it.
            gateway = start_gateway(None, config=config_path, rate_limit=True,
                                    startup_timeout=STARTUP_TIMEOUT,
                                    env={"PYTHONPATH": child_env()["PYTHONPATH"]})
            gateways[name] = gateway
            address = httpx.URL(gateway.url)
            answer_prefix = b'{"label":' if config.teacher == "onnx" else b'{"text":'
            workloads[name] = Workload(
                host=address.host, port=address.port, bodies=bodies,
                api_keys=api_keys if config.rate_limiter else [], answer_prefix=answer_prefix)
            server_pids[name] = [gateway.process.pid]
            if config.teacher == "openai":
                server_pids[name] += extra_pids["openai"]
            if config.rate_limiter == "redis":
                server_pids[name] += extra_pids["redis"]
            checks[name] = check_config(name, gateway.url, workloads[name], reply)
        startup_seconds = time.perf_counter() - started

        limit_output_us = None
        if any(CONFIGS[name].teacher == "openai" for name in configs):
            limit_output_us = time_limit_output(reply)

        runs = asyncio.run(run_all_cells(args, configs, workloads, server_pids))
    finally:
        for gateway in gateways.values():
            gateway.stop()
        if fake_server is not None:
            fake_server.stop()
        for process in children:
            stop_process(process)
    load_after = os.getloadavg()

    cells = {name: {level: summarize_cell(runs[name][level]) for level in levels}
             for name in configs}
    return {
        "benchmark": "gateway under load",
        "command": " ".join(["python", *sys.argv]),
        "settings": {"client": args.client, "concurrency": levels, "duration": args.duration,
                     "rounds": args.rounds, "warmup": args.warmup, "threads": args.threads,
                     "configs": configs,
                     "api_keys": "one per worker" if any(
                         CONFIGS[name].rate_limiter for name in configs) else "none",
                     "configured_keys": len(api_keys),
                     "unreached_rate_per_second": UNREACHED_RATE,
                     "unreached_burst": UNREACHED_BURST,
                     "uncut_output_limit": UNCUT_OUTPUT_LIMIT},
        "descriptions": {name: CONFIGS[name].description for name in configs},
        "machine": machine_info(args.redis_server if "rl-redis" in configs else None),
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "startup_seconds": startup_seconds,
        "total_seconds": time.perf_counter() - started,
        "checks": checks,
        "fake_reply_chars": len(reply),
        "limit_output_us": limit_output_us,
        "cells": cells,
        "ratios": compute_ratios(cells, levels),
    }


async def run_all_cells(args: argparse.Namespace, configs: list[str],
                        workloads: dict[str, Workload], server_pids: dict[str, list[int]]
                        ) -> dict[str, dict[int, list[CellResult]]]:
    runs: dict[str, dict[int, list[CellResult]]] = {
        name: {level: [] for level in args.concurrency} for name in configs}
    window = args.duration / args.rounds
    total = len(configs) * len(args.concurrency) * args.rounds
    finished = 0
    for level in args.concurrency:
        for round_index in range(args.rounds):
            order = configs if round_index % 2 == 0 else configs[::-1]
            for name in order:
                result = await run_cell(workloads[name], level, args.warmup, window,
                                        args.client, server_pids[name], args.request_timeout,
                                        args.max_requests)
                runs[name][level].append(result)
                finished += 1
                rate = result.tally.statuses.get("200", 0) / window
                print(f"[{finished}/{total}] {name}, {level} workers, round "
                      f"{round_index + 1}: {rate:.1f} req/s", file=sys.stderr)
    return runs


if __name__ == "__main__":
    sys.exit(main())
