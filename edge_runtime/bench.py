"""``edge-runtime bench``: how fast a model package loads and runs on this machine.

The benchmark reads the package once with the command's trust options, then measures:

- cold start, in ``cold_runs`` fresh child processes (``python -m edge_runtime.bench --child``)
  after one untimed warm-up child, split into the stages in ``COLD_STAGES``. Each child
  stamps the end of each stage and the parent stamps the spawn. The report gives the median,
  minimum and maximum of each stage.
- warm single-query latency (p50, p90, p99) in this process, per intra-op thread count.
- throughput in queries per second, per thread count and batch size.
- peak resident memory of a cold-start child and of this process, the package and model sizes,
  and the machine: CPU model, cores, the instruction-set flags that int8 kernels use, OS and
  library versions.

Only the base install is needed. Timings in a child use CLOCK_MONOTONIC, which parent and child
share on Linux and macOS. Where ``time.clock_gettime`` is missing (Windows), the ``startup``
stage is left out and ``total`` runs to the child's exit.
"""

from __future__ import annotations

import sys
import time

# A cold-start child stamps its start below, after importing only sys and time. The few
# imports after the stamp count in its "import" stage; functions import what else they use.

SHARED_CLOCK = hasattr(time, "clock_gettime") and hasattr(time, "CLOCK_MONOTONIC")


def now_ms() -> float:
    """Return milliseconds on a clock that parent and child share when SHARED_CLOCK is true."""
    if SHARED_CLOCK:
        return time.clock_gettime(time.CLOCK_MONOTONIC) * 1000.0
    return time.perf_counter() * 1000.0


MODULE_START_MS = now_ms()

# Imported after the stamp, so that a cold-start child counts them in its "import" stage.
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from edge_runtime.errors import ConfigError, EdgeRuntimeError  # noqa: E402

CHILD_FLAG = "--child"
SCHEMA = "edge-runtime-bench/1"
DEFAULT_RUNS = 200
DEFAULT_WARMUP = 20
DEFAULT_COLD_RUNS = 5
DEFAULT_THREADS = "1,2,4"
DEFAULT_BATCH_SIZES = "1,8,32"
MIN_THROUGHPUT_BATCHES = 3
CHILD_TIMEOUT_SECONDS = 600

# Cold-start stages in the order they happen, with what each one covers.
COLD_STAGES = {
    "startup": (
        "spawn of a fresh Python process to the first statement of edge_runtime.bench: "
        "interpreter start-up and the package's __init__, which imports no third-party module"
    ),
    "import": (
        "import of edge_runtime.runtime and the CLI's trust options, with numpy, onnxruntime, "
        "tokenizers, cryptography and httpx"
    ),
    "keys": (
        "load the trusted signer public keys and the device private key (PEM files or "
        "environment variables), as the CLI does"
    ),
    "verify": (
        "read the package file, verify the signature, check member digests, expiry and "
        "rollback"
    ),
    "decrypt": (
        "unwrap the content key, check its commitment and decrypt the model in memory; "
        "record the version in the rollback state"
    ),
    "session": (
        "create the tokenizer and the ONNX Runtime session from the model bytes, graph "
        "optimization included"
    ),
    "golden": (
        "run the package's golden inputs and compare labels, as EdgeRuntime does before its "
        "first answer"
    ),
    "first_answer": "tokenize the first query, run the session and take the top label",
    "total": (
        "spawn to the child's first answer, the sum of the stages above; process exit is not "
        "included"
    ),
}

# Varied English requests across intents, lengths and phrasings, plus out-of-scope questions.
BUILT_IN_QUERIES = (
    "what's the weather going to be like in boston tomorrow",
    "set an alarm for 6:30 am",
    "transfer 200 dollars from checking to savings",
    "how do you say thank you in japanese",
    "book me a flight to denver next friday",
    "what is my current bank balance",
    "remind me to call the dentist at 3 pm",
    "play some relaxing jazz",
    "how many calories are in a banana",
    "i lost my credit card, please freeze it",
    "what's the exchange rate from euros to dollars",
    "add milk and eggs to my shopping list",
    "when is my next car payment due",
    "find me a good italian restaurant nearby",
    "how long will it take to drive to chicago",
    "what time is it in tokyo right now",
    "can you tell me a joke",
    "turn the volume down a little",
    "i need to change my pin number",
    "is my flight to london on time",
    "what's on my calendar for thursday",
    "convert 5 miles to kilometers",
    "roll a six sided die",
    "what's the interest rate on my savings account",
    "how do i reset my router",
    "please cancel my hotel reservation for next weekend",
    "how much is left on my gift card",
    "give me a recipe for vegetable soup",
    "who sang the song that's playing",
    "what's the tire pressure supposed to be on my car",
    "schedule a meeting with sarah on monday at ten",
    "i want to report a fraudulent charge of 89 dollars at a gas station",
    "how do i get to the nearest train station from here",
    "what does the word ephemeral mean",
    "flip a coin",
    "are there any travel alerts for mexico",
    "what's my credit score",
    "order a large pepperoni pizza for delivery",
    "how many vacation days do i have left this year",
    "text my brother that i'll be twenty minutes late",
    "who won the world cup in 1998",
    "how do i bake sourdough bread at home",
    "tell me the plot of hamlet",
    "what is the boiling point of mercury",
    "can you help me with the thing from yesterday",
    "i want to know more about my money situation",
    "what should i do about my card",
    "is it going to be a problem if i go now",
)


class BenchmarkError(EdgeRuntimeError):
    """A benchmark step failed, for example a cold-start child process."""


# ---------------------------------------------------------------------------------------------
# Settings


TRUST_OPTION_DEFAULTS = {
    "signer_key": [],
    "device_key": None,
    "passphrase_env": None,
    "state_file": None,
    "allow_downgrade": False,
    "allow_unsigned": False,
}


@dataclass(frozen=True)
class BenchSettings:
    """What to measure. ``trust_options`` contains the CLI's trust option values (the keys of
    ``TRUST_OPTION_DEFAULTS``), from which the parent and every child build their trust policy."""

    package: str
    trust_options: dict[str, Any] = field(default_factory=lambda: dict(TRUST_OPTION_DEFAULTS))
    runs: int = DEFAULT_RUNS
    warmup: int = DEFAULT_WARMUP
    cold_runs: int = DEFAULT_COLD_RUNS
    threads: tuple[int, ...] = (1, 2, 4)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    inter_op_threads: int = 1
    graph_optimization: str = "all"
    providers: tuple[str, ...] | None = None
    queries_file: str | None = None


def settings_from_args(args: Any) -> BenchSettings:
    """Build the settings from the parsed options of ``edge-runtime bench``."""
    trust_options = {
        name: getattr(args, name, default) for name, default in TRUST_OPTION_DEFAULTS.items()
    }
    return BenchSettings(
        package=args.package,
        trust_options=trust_options,
        runs=args.runs,
        warmup=args.warmup,
        cold_runs=args.cold_runs,
        threads=tuple(args.threads),
        batch_sizes=tuple(args.batch_sizes),
        inter_op_threads=args.inter_op_threads,
        graph_optimization=args.graph_optimization,
        providers=tuple(args.providers) if args.providers else None,
        queries_file=args.queries,
    )


def positive_int_list(value: str) -> list[int]:
    """argparse type: comma-separated integers of at least 1, such as ``1,2,4``."""
    import argparse

    numbers = []
    for item in value.split(","):
        try:
            number = int(item.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item.strip()!r} in {value!r} is not an integer; pass a list such as 1,2,4"
            ) from None
        if number < 1:
            raise argparse.ArgumentTypeError(f"{number} in {value!r} must be at least 1")
        if number not in numbers:
            numbers.append(number)
    return numbers


def name_list(value: str) -> list[str]:
    """argparse type: comma-separated names, such as ``name1,name2``."""
    import argparse

    names = [item.strip() for item in value.split(",") if item.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{value!r} contains no names")
    return names


def load_queries(path: str | None) -> tuple[list[str], str]:
    """Return the benchmark queries and where they came from: one query per non-empty line of
    the UTF-8 file at ``path``, or the built-in list when ``path`` is None."""
    if path is None:
        return list(BUILT_IN_QUERIES), "built-in"
    try:
        with open(path, encoding="utf-8-sig") as handle:
            queries = [line.strip() for line in handle if line.strip()]
    except OSError as exc:
        raise ConfigError(
            f"cannot read the queries file {path}: {exc.strerror or exc}; pass a "
            "UTF-8 text file with one query per line"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"queries file {path} is not valid UTF-8 ({exc.reason}); save it as UTF-8"
        ) from None
    if not queries:
        raise ConfigError(f"queries file {path} has no non-empty lines; put one query per line")
    return queries, path


def usable_cpus() -> int:
    """Return the number of CPUs this process may run on (its affinity mask, where known)."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cap_threads(requested: tuple[int, ...], cpus: int) -> tuple[list[int], list[str]]:
    """Cap each thread count at ``cpus``, drop repeats, and return the counts with notes."""
    capped: list[int] = []
    for count in requested:
        value = min(count, cpus)
        if value not in capped:
            capped.append(value)
    notes = []
    over = [count for count in requested if count > cpus]
    if over:
        notes.append(
            f"thread count(s) {', '.join(map(str, over))} exceed the {cpus} CPU(s) this process "
            f"may use, so they were capped at {cpus}; measured {', '.join(map(str, capped))}"
        )
    return capped, notes


# ---------------------------------------------------------------------------------------------
# Memory and machine


def peak_rss() -> tuple[int | None, str]:
    """Return this process's peak resident set size in bytes and where it was read.

    Linux reports it as VmHWM in /proc/self/status. Elsewhere ``resource.getrusage`` gives
    ru_maxrss, in bytes on macOS and in KiB on other Unix systems. Without either, the size is
    None.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    value, unit = line.split()[1:3]
                    if unit == "kB":
                        return int(value) * 1024, "VmHWM in /proc/self/status"
    except (OSError, ValueError):
        pass
    try:
        import resource
    except ImportError:
        return None, "unavailable"
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024
    return maxrss * scale, "ru_maxrss from resource.getrusage"


# ARM's own CPU part numbers (implementer 0x41), from Linux arch/arm64/include/asm/cputype.h.
ARM_CPU_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd0d": "Cortex-A77",
    "0xd0e": "Cortex-A76AE",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd42": "Cortex-A78AE",
    "0xd46": "Cortex-A510",
    "0xd48": "Cortex-X2",
    "0xd49": "Neoverse-N2",
    "0xd4b": "Cortex-A78C",
    "0xd4e": "Cortex-X3",
    "0xd4f": "Neoverse-V2",
    "0xd81": "Cortex-A720",
    "0xd82": "Cortex-X4",
}
ARM_IMPLEMENTER = "0x41"

# Instruction-set flags that ONNX Runtime's int8 kernels can use, as /proc/cpuinfo spells them.
X86_INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
ARM_INT8_FLAGS = ("asimd", "asimddp", "i8mm", "sve")


def parse_cpuinfo(text: str) -> dict[str, str]:
    """Return the ``key: value`` fields of /proc/cpuinfo text; the first value of a key wins,
    so per-CPU fields come from the first processor."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, separator, value = line.partition(":")
        if separator and key.strip() and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


def read_cpuinfo() -> dict[str, str]:
    """Return the parsed fields of /proc/cpuinfo, or an empty dict where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            return parse_cpuinfo(handle.read())
    except OSError:
        return {}


def describe_cpu(fields: dict[str, str], machine: str, processor: str) -> dict[str, Any]:
    """Return the CPU model, where it was read, and the int8 instruction-set flags.

    ``fields`` are parsed /proc/cpuinfo fields (empty when unreadable); ``machine`` and
    ``processor`` are ``platform.machine()`` and ``platform.processor()``. The flags are None
    when /proc/cpuinfo lists no flags for this architecture.
    """
    implementer = fields.get("CPU implementer", "").lower()
    part = fields.get("CPU part", "").lower()
    if fields.get("model name"):
        model, source = fields["model name"], "model name in /proc/cpuinfo"
    elif implementer == ARM_IMPLEMENTER and part in ARM_CPU_PARTS:
        model = f"ARM {ARM_CPU_PARTS[part]}"
        source = "CPU implementer and CPU part in /proc/cpuinfo"
    elif part:
        model = f"CPU implementer {implementer or 'unknown'}, part {part}"
        source = "CPU implementer and CPU part in /proc/cpuinfo"
    elif fields.get("Hardware"):
        model, source = fields["Hardware"], "Hardware in /proc/cpuinfo"
    elif processor:
        model, source = processor, "platform.processor()"
    else:
        model, source = machine or "unknown", "platform.machine()"

    lowered = machine.lower()
    if lowered in ("x86_64", "amd64", "i386", "i686"):
        listed, wanted = fields.get("flags"), X86_INT8_FLAGS
    elif lowered in ("aarch64", "arm64") or lowered.startswith("arm"):
        listed, wanted = fields.get("Features"), ARM_INT8_FLAGS
    else:
        listed, wanted = None, ()
    flags = None
    if listed is not None:
        present = set(listed.split())
        flags = {flag: flag in present for flag in wanted}
    return {"cpu_model": model, "cpu_model_source": source, "isa_flags": flags}


def this_cpu() -> dict[str, Any]:
    """Return ``describe_cpu`` for the machine this runs on."""
    import platform

    return describe_cpu(read_cpuinfo(), platform.machine(), platform.processor())


def read_board_model() -> str | None:
    """Return the board name from the device tree (for example a Raspberry Pi), or None."""
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            with open(path, "rb") as handle:
                return handle.read().rstrip(b"\0").decode("utf-8", "replace").strip() or None
        except OSError:
            continue
    return None


def load_average() -> float | None:
    """Return the 1-minute load average, or None where the OS does not report it."""
    import os

    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_info() -> dict[str, Any]:
    """Describe this machine: CPU, cores, int8 instruction-set flags, OS and library versions."""
    import os
    import platform

    import numpy
    import onnxruntime
    import tokenizers

    fields = read_cpuinfo()
    info = describe_cpu(fields, platform.machine(), platform.processor())
    board = read_board_model() or fields.get("Model")
    try:
        os_release = platform.freedesktop_os_release().get("PRETTY_NAME")
    except (AttributeError, OSError):
        os_release = None
    return {
        **info,
        "board": board,
        "architecture": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "os": platform.platform(),
        "os_release": os_release,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "numpy": numpy.__version__,
        "tokenizers": tokenizers.__version__,
    }


# ---------------------------------------------------------------------------------------------
# Cold start: child side


def check_golden(classifier: Any) -> tuple[int, list[str]]:
    """Run the manifest's golden inputs through ``classifier``; return how many there are and
    a description of each mismatch."""
    golden = classifier.package.manifest.raw.get("golden") or []
    failures = []
    for item in golden:
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            failures.append(f"malformed golden entry {item!r:.80}")
            continue
        label = classifier.labels[int(classifier.predict(item["text"]).logits.argmax())]
        if label != item.get("label"):
            failures.append(f"{item['text']!r}: expected {item.get('label')!r}, got {label!r}")
    return len(golden), failures


def child_main(spec_json: str) -> int:
    """Run one cold start from a JSON spec and print its stage stamps as one JSON line."""
    import argparse
    import json

    # The cascade's module is imported although only the model runs here, because an app that
    # uses EdgeRuntime imports it (and httpx with it) at start-up.
    import edge_runtime.runtime  # noqa: F401
    from edge_runtime.model import OnnxClassifier
    from edge_runtime.package import read_package
    from edge_runtime.package_cli import trust_from_args

    stamps = {"entry": MODULE_START_MS, "imported": now_ms()}
    spec = json.loads(spec_json)
    try:
        trust = trust_from_args(argparse.Namespace(**spec["trust"]))
        stamps["keys"] = now_ms()
        package = read_package(spec["package"], trust,
                               on_stage=lambda stage: stamps.__setitem__(stage, now_ms()))
        classifier = OnnxClassifier(
            package,
            threads=spec["threads"],
            inter_op_threads=spec["inter_op_threads"],
            graph_optimization=spec["graph_optimization"],
            providers=spec["providers"],
        )
        stamps["session"] = now_ms()
        golden_count, golden_failures = check_golden(classifier)
        stamps["golden"] = now_ms()
        logits = classifier.predict(spec["query"]).logits
        label = classifier.labels[int(logits.argmax())]
        stamps["first_answer"] = now_ms()
    except (EdgeRuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rss, rss_source = peak_rss()
    print(
        json.dumps(
            {
                "stamps_ms": stamps,
                "label": label,
                "golden_count": golden_count,
                "golden_failures": golden_failures,
                "peak_rss_bytes": rss,
                "peak_rss_source": rss_source,
            }
        ),
        flush=True,
    )
    return 0


# ---------------------------------------------------------------------------------------------
# Cold start: parent side


def child_environment(scratch: str, notes: list[str]) -> dict[str, str]:
    """Return the environment for cold-start children: this one, plus the folder that contains
    this edge_runtime on PYTHONPATH, and bytecode caching where it was turned off."""
    import os
    from pathlib import Path

    env = dict(os.environ)
    package_root = Path(__file__).resolve().parents[1]
    # A source checkout is not on the child's path when the parent started from another folder.
    # An installed package is, and its site-packages folder must not go ahead of the stdlib.
    if package_root.name not in ("site-packages", "dist-packages"):
        existing = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(package_root) + (os.pathsep + existing if existing else "")
    if env.pop("PYTHONDONTWRITEBYTECODE", None):
        # Installed packages ship compiled bytecode. Without this, each child would compile
        # edge_runtime's modules from source, a cost that no installed device pays.
        env["PYTHONPYCACHEPREFIX"] = str(Path(scratch) / "pycache")
        notes.append(
            "PYTHONDONTWRITEBYTECODE was set, so cold-start processes cached their "
            "bytecode in a temporary folder (filled by the untimed warm-up process)"
        )
    return env


def child_trust_options(trust_options: dict[str, Any], scratch: str) -> dict[str, Any]:
    """Return the trust options for the children, with a private copy of the rollback state.

    The parent has already checked and recorded the package's version in the real state file,
    as ``ask`` does. Each child checks against a copy, so repeated loads neither trip the
    rollback check nor rewrite the device's state file.
    """
    import shutil
    from pathlib import Path

    from edge_runtime.package_cli import default_state_file

    options = dict(trust_options)
    state_file = options.get("state_file")
    if state_file is None:
        state_file = default_state_file()
    if state_file:
        copy = Path(scratch) / "accepted-versions.json"
        if Path(state_file).is_file():
            shutil.copyfile(state_file, copy)
        state_file = str(copy)
    options["state_file"] = state_file
    return options


def run_cold_child(spec: dict[str, Any], env: dict[str, str], run: str) -> dict[str, float]:
    """Spawn one cold-start child and return its stage durations in milliseconds."""
    import json
    import subprocess

    command = [sys.executable, "-m", "edge_runtime.bench", CHILD_FLAG, json.dumps(spec)]
    spawned = now_ms()
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=CHILD_TIMEOUT_SECONDS
        )
    except subprocess.TimeoutExpired:
        raise BenchmarkError(
            f"cold-start process ({run}) timed out after {CHILD_TIMEOUT_SECONDS} s without "
            "printing its result"
        ) from None
    exited = now_ms()
    if completed.returncode != 0 or not completed.stdout.strip():
        lines = [line for line in completed.stderr.splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else "no error output"
        raise BenchmarkError(
            f"cold-start process ({run}) failed with exit code {completed.returncode}: {reason}"
        )
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    stamps = result["stamps_ms"]
    stages = {
        "import": stamps["imported"] - stamps["entry"],
        "keys": stamps["keys"] - stamps["imported"],
        "verify": stamps["verified"] - stamps["keys"],
        "decrypt": stamps["decrypted"] - stamps["verified"],
        "session": stamps["session"] - stamps["decrypted"],
        "golden": stamps["golden"] - stamps["session"],
        "first_answer": stamps["first_answer"] - stamps["golden"],
    }
    if SHARED_CLOCK:
        stages["startup"] = stamps["entry"] - spawned
        stages["total"] = stamps["first_answer"] - spawned
    else:
        # NOTE: without a clock shared with the child, the total includes process exit.
        stages["total"] = exited - spawned
    result["stages_ms"] = stages
    return result


def measure_cold_start(
    spec: dict[str, Any], env: dict[str, str], runs: int, progress: Progress
) -> dict[str, Any]:
    """Run one untimed warm-up child and ``runs`` timed ones; summarize each stage."""
    import statistics

    results = []
    for index in range(runs + 1):
        run = "warm-up" if index == 0 else f"run {index} of {runs}"
        progress.show(f"cold start: fresh process, {run}")
        result = run_cold_child(spec, env, run)
        if index > 0:
            results.append(result)

    stages = {}
    for name, covers in COLD_STAGES.items():
        values = [result["stages_ms"][name] for result in results if name in result["stages_ms"]]
        if not values:
            continue
        stages[name] = {
            "median_ms": round(statistics.median(values), 3),
            "min_ms": round(min(values), 3),
            "max_ms": round(max(values), 3),
            "covers": covers,
        }
    rss = [result["peak_rss_bytes"] for result in results if result["peak_rss_bytes"]]
    last = results[-1]
    return {
        "runs": runs,
        "warmup_runs": 1,
        "threads": spec["threads"],
        "query": spec["query"],
        "label": last["label"],
        "stages": stages,
        "golden": {"checked": last["golden_count"], "failures": last["golden_failures"]},
        "peak_rss_bytes": int(statistics.median(rss)) if rss else None,
        "peak_rss_source": last["peak_rss_source"],
    }


# ---------------------------------------------------------------------------------------------
# Warm latency and throughput


def percentiles_ms(values: list[float]) -> dict[str, float]:
    """Return p50, p90 and p99 (linear interpolation between ranks), mean, min and max."""
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(data, [50.0, 90.0, 99.0])
    return {
        "p50_ms": round(float(p50), 4),
        "p90_ms": round(float(p90), 4),
        "p99_ms": round(float(p99), 4),
        "mean_ms": round(float(data.mean()), 4),
        "min_ms": round(float(data.min()), 4),
        "max_ms": round(float(data.max()), 4),
    }


def measure_latency(classifier: Any, queries: list[str], runs: int, warmup: int) -> dict[str, Any]:
    """Time ``runs`` single queries, each tokenized, run and reduced to its top label, after
    ``warmup`` untimed ones. Queries are taken in order, repeating the list as needed."""
    import numpy as np

    for index in range(warmup):
        classifier.predict(queries[index % len(queries)])
    totals, tokenize, inference = [], [], []
    for index in range(runs):
        start = time.perf_counter()
        prediction = classifier.predict(queries[index % len(queries)])
        classifier.labels[int(prediction.logits.argmax())]
        totals.append((time.perf_counter() - start) * 1000.0)
        tokenize.append(prediction.tokenize_ms)
        inference.append(prediction.inference_ms)
    return {
        "threads": classifier.threads,
        "runs": runs,
        "warmup": warmup,
        **percentiles_ms(totals),
        "tokenize_p50_ms": round(float(np.median(tokenize)), 4),
        "inference_p50_ms": round(float(np.median(inference)), 4),
    }


def measure_throughput(
    classifier: Any, queries: list[str], batch_size: int, runs: int
) -> dict[str, Any]:
    """Run at least ``runs`` queries (whole batches, at least MIN_THROUGHPUT_BATCHES) in
    batches of ``batch_size``, one session run per batch, after one untimed batch."""
    import numpy as np

    batches = max(MIN_THROUGHPUT_BATCHES, -(-runs // batch_size))
    texts = [queries[index % len(queries)] for index in range((batches + 1) * batch_size)]
    classifier.predict_batch(texts[:batch_size], batch_size=batch_size)
    durations = []
    for batch in range(1, batches + 1):
        chunk = texts[batch * batch_size : (batch + 1) * batch_size]
        start = time.perf_counter()
        classifier.predict_batch(chunk, batch_size=batch_size)
        durations.append(time.perf_counter() - start)
    elapsed = sum(durations)
    return {
        "threads": classifier.threads,
        "batch_size": batch_size,
        "batches": batches,
        "queries": batches * batch_size,
        "queries_per_second": round(batches * batch_size / elapsed, 2),
        "batch_p50_ms": round(float(np.median(durations)) * 1000.0, 4),
    }


# ---------------------------------------------------------------------------------------------
# The whole run


class Progress:
    """Progress lines on a stream (stderr): rewritten in place on a terminal, else one per
    step."""

    def __init__(self, stream: Any = None, enabled: bool = True):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._width = 0

    def show(self, message: str) -> None:
        if not self.enabled:
            return
        if self.live:
            self.stream.write("\r" + message.ljust(self._width))
            self._width = len(message)
        else:
            self.stream.write(message + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def describe_package(path: str, package: Any) -> dict[str, Any]:
    """Return the package's identity and sizes: the file on disk and the decrypted members."""
    import os

    manifest = package.manifest
    encrypted = sorted((manifest.raw.get("encryption") or {}).get("members") or {})
    return {
        "path": path,
        "name": manifest.name,
        "version": manifest.version,
        "precision": manifest.precision,
        "labels": len(manifest.labels),
        "signer_key_id": package.signer_key_id,
        "encrypted_members": encrypted,
        "file_bytes": os.path.getsize(path),
        "model_bytes": len(package.model_bytes),
        "tokenizer_bytes": len(package.members[manifest.tokenizer_member]),
    }


def check_settings(settings: BenchSettings) -> tuple[list[str], list[int], list[str]]:
    """Validate the settings before anything runs; return the execution providers to use, the
    thread counts capped at the usable CPUs, and notes for the report."""
    from edge_runtime.model import check_positive_int, graph_optimization_level, resolve_providers

    for name in ("runs", "cold_runs", "inter_op_threads"):
        check_positive_int(getattr(settings, name), name)
    warmup = settings.warmup
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup is {warmup!r}; expected an integer of 0 or more")
    for name in ("threads", "batch_sizes"):
        values = getattr(settings, name)
        if not values:
            raise ConfigError(f"{name} is empty; pass at least one value, such as 1")
        for value in values:
            check_positive_int(value, name)
    graph_optimization_level(settings.graph_optimization)
    providers = resolve_providers(settings.providers)
    threads, notes = cap_threads(settings.threads, usable_cpus())
    dropped = [name for name in settings.providers or () if name not in providers]
    if dropped:
        notes.append(
            f"execution provider(s) {', '.join(dropped)} are not in this onnxruntime build "
            "and were not used"
        )
    return providers, threads, notes


def measure_warm(
    package: Any,
    threads: list[int],
    session_options: dict[str, Any],
    queries: list[str],
    settings: BenchSettings,
    progress: Progress,
) -> dict[str, Any]:
    """Measure latency and throughput in this process, one session per thread count."""
    from edge_runtime.model import OnnxClassifier

    latency, throughput = [], []
    providers: tuple[str, ...] = ()
    token_counts: list[int] = []
    for count in threads:
        classifier = OnnxClassifier(package, threads=count, **session_options)
        providers = classifier.providers
        if not token_counts:
            token_counts = [len(classifier.tokenizer.encode(text).ids) for text in queries]
        progress.show(f"latency: {settings.runs} single queries, {count} intra-op thread(s)")
        latency.append(measure_latency(classifier, queries, settings.runs, settings.warmup))
        for batch_size in settings.batch_sizes:
            progress.show(f"throughput: batches of {batch_size}, {count} intra-op thread(s)")
            throughput.append(measure_throughput(classifier, queries, batch_size, settings.runs))
        del classifier
    return {
        "latency": latency,
        "throughput": throughput,
        "providers": list(providers),
        "mean_tokens": round(sum(token_counts) / len(token_counts), 2),
    }


def run_benchmark(settings: BenchSettings, progress: Progress | None = None) -> dict[str, Any]:
    """Run every measurement and return the report (``format_table`` renders it as text).

    Raises ``ConfigError`` for invalid settings, the package errors of ``read_package`` for a
    missing, corrupt or untrusted package, and ``BenchmarkError`` when a child process fails.
    """
    import argparse
    import datetime as dt
    import os
    import tempfile

    from edge_runtime.package import read_package
    from edge_runtime.package_cli import trust_from_args

    progress = progress if progress is not None else Progress()
    started = time.perf_counter()
    providers, threads, notes = check_settings(settings)
    queries, queries_source = load_queries(settings.queries_file)

    trust = trust_from_args(argparse.Namespace(**settings.trust_options))
    package = read_package(settings.package, trust)
    session_options = {
        "inter_op_threads": settings.inter_op_threads,
        "graph_optimization": settings.graph_optimization,
        "providers": providers,
    }
    load_before = load_average()

    with tempfile.TemporaryDirectory(prefix="edge-runtime-bench-") as scratch:
        spec = {
            "package": os.path.abspath(settings.package),
            "trust": child_trust_options(settings.trust_options, scratch),
            "threads": threads[0],
            "query": queries[0],
            **session_options,
        }
        env = child_environment(scratch, notes)
        cold_start = measure_cold_start(spec, env, settings.cold_runs, progress)
    golden = cold_start["golden"]
    if golden["failures"]:
        notes.append(
            f"the model disagrees with {len(golden['failures'])} of {golden['checked']} golden "
            "inputs on this CPU, so EdgeRuntime would escalate every query instead of "
            "answering locally"
        )

    warm = measure_warm(package, threads, session_options, queries, settings, progress)
    progress.finish()

    rss, rss_source = peak_rss()
    load_after = load_average()
    machine = machine_info()
    if machine["isa_flags"] is None:
        notes.append("instruction-set flags are unknown: /proc/cpuinfo lists none for this machine")
    return {
        "schema": SCHEMA,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - started, 2),
        "package": describe_package(settings.package, package),
        "session": {
            "graph_optimization": settings.graph_optimization,
            "inter_op_threads": settings.inter_op_threads,
            "providers_requested": list(settings.providers) if settings.providers else None,
            "providers": warm["providers"],
            "threads_requested": list(settings.threads),
            "threads": threads,
        },
        "queries": {
            "source": queries_source,
            "count": len(queries),
            "mean_tokens": warm["mean_tokens"],
        },
        "machine": machine,
        "load_average_1min": {"before": load_before, "after": load_after},
        "cold_start": cold_start,
        "latency": warm["latency"],
        "throughput": warm["throughput"],
        "memory": {
            "cold_start_peak_rss_bytes": cold_start["peak_rss_bytes"],
            "benchmark_peak_rss_bytes": rss,
            "source": rss_source,
        },
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------
# Output


def _megabytes(value: int | None) -> str:
    return "unknown" if value is None else f"{value / 1e6:.1f} MB"


def _yes_no(flags: dict[str, bool] | None) -> str:
    if flags is None:
        return "unknown"
    return ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in flags.items())


def format_table(report: dict[str, Any]) -> str:
    """Return the report as plain-text tables, in the order of the JSON record."""
    import textwrap

    package, machine, session = report["package"], report["machine"], report["session"]
    cold, memory = report["cold_start"], report["memory"]
    encrypted = ", ".join(package["encrypted_members"]) or "nothing"
    # The first 16 hex digits identify the key in the table, as in rollback messages.
    signer = (package["signer_key_id"] or "not verified")[:16]
    cpu = machine["cpu_model"] + (f" on {machine['board']}" if machine["board"] else "")
    lines = [
        f"edge-runtime bench: {package['path']}",
        "",
        f"  package    {package['name']} version {package['version']}, {package['precision']}, "
        f"{package['labels']} labels, signer key {signer}, encrypted: {encrypted}",
        f"  sizes      package file {_megabytes(package['file_bytes'])} on disk, model "
        f"{_megabytes(package['model_bytes'])} decrypted, tokenizer "
        f"{_megabytes(package['tokenizer_bytes'])}",
        f"  cpu        {cpu} ({machine['architecture']}), {machine['logical_cpus']} logical "
        f"CPUs, {machine['usable_cpus']} usable",
        f"  int8 isa   {_yes_no(machine['isa_flags'])}",
        f"  os         {machine['os_release'] or machine['os']}, {machine['python']}",
        f"  libraries  onnxruntime {machine['onnxruntime']}, numpy {machine['numpy']}, "
        f"tokenizers {machine['tokenizers']}",
        f"  session    {', '.join(session['providers'])}; graph optimization "
        f"{session['graph_optimization']}; inter-op threads {session['inter_op_threads']}",
        f"  queries    {report['queries']['count']} ({report['queries']['source']}), "
        f"{report['queries']['mean_tokens']:.1f} tokens each on average, as the package's "
        "tokenizer gives them",
        "",
        f"Cold start: {cold['runs']} fresh process(es) after {cold['warmup_runs']} untimed "
        f"warm-up, {cold['threads']} intra-op thread(s)",
        f"  {'stage':<20} {'median ms':>10} {'min ms':>9} {'max ms':>9}",
    ]
    for name, stage in cold["stages"].items():
        lines.append(
            f"  {name:<20} {stage['median_ms']:>10.1f} {stage['min_ms']:>9.1f} "
            f"{stage['max_ms']:>9.1f}"
        )
    golden = cold["golden"]
    lines.append(
        f"  golden inputs: {golden['checked'] - len(golden['failures'])} of "
        f"{golden['checked']} match on this CPU; first answer: {cold['label']!r}"
    )
    lines.append("  stages:")
    for name, stage in cold["stages"].items():
        lines += textwrap.wrap(
            f"{name}: {stage['covers']}",
            width=96,
            initial_indent="    ",
            subsequent_indent="      ",
        )

    latency = report["latency"]
    lines += [
        "",
        f"Warm single-query latency: {latency[0]['runs']} queries per row after "
        f"{latency[0]['warmup']} untimed, tokenize + run + top label",
        f"  {'threads':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean ms':>8} "
        f"{'tokenize p50':>13} {'run p50':>8}",
    ]
    for row in latency:
        lines.append(
            f"  {row['threads']:>7} {row['p50_ms']:>8.3f} {row['p90_ms']:>8.3f} "
            f"{row['p99_ms']:>8.3f} {row['mean_ms']:>8.3f} "
            f"{row['tokenize_p50_ms']:>13.3f} {row['inference_p50_ms']:>8.3f}"
        )

    batch_sizes = sorted({row["batch_size"] for row in report["throughput"]})
    lines += [
        "",
        "Throughput, queries per second (padded batches, one session run per batch):",
        f"  {'threads':>7} " + " ".join(f"{f'batch {size}':>10}" for size in batch_sizes),
    ]
    for count in session["threads"]:
        cells = {
            row["batch_size"]: row["queries_per_second"]
            for row in report["throughput"]
            if row["threads"] == count
        }
        lines.append(f"  {count:>7} " + " ".join(f"{cells[size]:>10.1f}" for size in batch_sizes))

    lines += [
        "",
        "Memory (peak resident set size):",
        f"  cold-start process, load and first answer (median): "
        f"{_megabytes(memory['cold_start_peak_rss_bytes'])}",
        f"  this benchmark process, every session and batch:    "
        f"{_megabytes(memory['benchmark_peak_rss_bytes'])}",
        f"  read from {memory['source']}",
    ]
    if report["notes"]:
        lines += ["", "Notes:"]
        for note in report["notes"]:
            lines += textwrap.wrap(note, width=96, initial_indent="  - ", subsequent_indent="    ")
    lines += [
        "",
        f"Finished in {report['duration_s']:.1f} s; 1-minute load average "
        f"{report['load_average_1min']['before']} before, "
        f"{report['load_average_1min']['after']} after.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == CHILD_FLAG:
        sys.exit(child_main(sys.argv[2]))
    from edge_runtime.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
