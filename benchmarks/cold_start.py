"""Cold start to the first answer: the signed, encrypted student package through edge_runtime
against plain ONNX Runtime on the same int8 model, in one run.

    python benchmarks/cold_start.py [--runs 15] [--package models/clinc150-student.edgepkg]
        [--model-onnx FILE --tokenizer FILE] [--signer-key PEM] [--device-key PEM]
        [--query TEXT] [--threads 1] [--json FILE]

Without ``--model-onnx`` and ``--tokenizer``, the parent decrypts the package once with the
device key and writes its model and tokenizer in plaintext to a temporary folder for the plain
variant, so the two variants load byte-identical files.

Each measurement is a fresh child process, this script in child mode, timed from just before
the spawn to the moment the parent reads the child's answer line. Process exit is not timed.

- ``edge``: what an app does: import ``edge_runtime`` (with numpy, onnxruntime, tokenizers
  and cryptography), load the signer public key and the device private key,
  ``EdgeRuntime.load`` (signature, digests, expiry, rollback, unwrap and decrypt in memory,
  then the tokenizer, the InferenceSession from bytes and the golden checks), then the first
  ``EdgeRuntime.answer`` with no teacher.
- ``plain``: import numpy, onnxruntime and tokenizers, read the labels, load tokenizer.json
  and create an InferenceSession from the plaintext .onnx path, then tokenize, run and take the
  argmax.

Both use the same session options (``--threads`` intra-op threads, ORT_ENABLE_ALL) and the same
tokenizer settings. The variants are interleaved, and which one goes first alternates, so that
a change in machine load hits both alike. Each child also reports its own breakdown in milliseconds:

- ``startup``: spawn to the child's first statement (interpreter start).
- ``import``: the libraries each variant needs (edge_runtime adds cryptography and its own
  modules to numpy, onnxruntime and tokenizers).
- ``keys`` (edge): load the signer public key and the device private key.
- ``read_verify``: edge reads the archive and checks signature, digests, expiry and rollback.
  Plain reads only the small labels file.
- ``decrypt`` (edge): unwrap the content key and decrypt the model in memory.
- ``session``: load the tokenizer and create the InferenceSession. Plain reads the .onnx file
  here, while edge already holds the bytes.
- ``golden`` (edge): run the manifest's golden inputs.
- ``first_answer``: tokenize, run and pick the label of the first query.
- ``child_total``: the child's first statement to its answer. ``wall``: spawn to the parent
  reading the answer line.

Files stay in the OS page cache between runs, so this measures a cold process, not a cold
disk. The children run with bytecode caching on (``PYTHONDONTWRITEBYTECODE`` removed and
``PYTHONPYCACHEPREFIX`` set to a temporary folder), so the untimed warm-up compiles this
repository's modules once, as ``pip install`` does for an installed package; without it each
child would compile edge_runtime from source, about 50 ms on a 2-core x86 VM, that no
installed device pays. The rollback state lives in a temporary folder, and the untimed warm-up
run records the package version there, so timed runs only read it. The cross-process timestamps use
CLOCK_MONOTONIC, which is system-wide on Linux. Where ``time.clock_gettime`` is missing
(Windows), ``startup`` is left out.
"""

from __future__ import annotations

import sys
import time

# Only sys and time are imported at the top, so that a child process spends its time in the
# work it measures (python -X importtime puts pathlib and typing at about 20 ms each on a
# 2-core x86 VM). The parent's functions import what they need.

DEFAULT_QUERY = "what's the weather going to be like in boston tomorrow"
CHILD_FLAG = "--child"
VARIANTS = ("edge", "plain")
STAGES = ("startup", "import", "keys", "read_verify", "decrypt", "session", "golden",
          "first_answer", "child_total", "wall")


SHARED_CLOCK = hasattr(time, "clock_gettime") and hasattr(time, "CLOCK_MONOTONIC")


def now_ms() -> float:
    """Return milliseconds on a clock that parent and child share when SHARED_CLOCK is true."""
    if SHARED_CLOCK:
        return time.clock_gettime(time.CLOCK_MONOTONIC) * 1000.0
    return time.perf_counter() * 1000.0


CHILD_ENTRY_MS = now_ms()


# Child mode: one cold start, reported as one JSON line on stdout.


def run_edge_child(spec: dict) -> dict:
    """Load the package through edge_runtime, answer the query and return the timings."""
    stamps = {"entry": CHILD_ENTRY_MS}
    sys.path.insert(0, spec["repo_root"])
    import edge_runtime.package as package_module
    import edge_runtime.runtime as runtime_module
    from edge_runtime import encryption, signing
    from edge_runtime.package import TrustPolicy
    from edge_runtime.rollback import RollbackState
    from edge_runtime.runtime import EdgeRuntime
    stamps["imported"] = now_ms()

    with open(spec["signer_key"], "rb") as handle:
        signer_public = signing.load_public_key_pem(handle.read())
    device_private = encryption.load_private_key(spec["device_key"])
    trust = TrustPolicy(trusted_keys=(signer_public,), device_key=device_private,
                        rollback=RollbackState(spec["state_file"]))
    stamps["keys"] = now_ms()

    # NOTE: EdgeRuntime.load does everything in one call. Wrapping these module functions
    # splits its time into stages, so this breaks if load stops calling them.
    spans: dict[str, list[float]] = {"read": [], "decrypt": [], "golden": []}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            start = now_ms()
            try:
                return function(*args, **kwargs)
            finally:
                spans[name].append(now_ms() - start)
        return wrapper

    package_module._decrypt = timed("decrypt", package_module._decrypt)
    runtime_module.read_package = timed("read", runtime_module.read_package)
    EdgeRuntime._check_golden = timed("golden", EdgeRuntime._check_golden)
    original_init = EdgeRuntime.__init__
    init_started = []

    def marked_init(self, *args, **kwargs):
        init_started.append(now_ms())
        original_init(self, *args, **kwargs)

    EdgeRuntime.__init__ = marked_init
    runtime = EdgeRuntime.load(spec["package"], threads=spec["threads"], trust=trust)
    stamps["runtime"] = now_ms()
    answer = runtime.answer(spec["query"])
    stamps["answered"] = now_ms()

    read, decrypted, golden = (sum(spans[name]) for name in ("read", "decrypt", "golden"))
    breakdown = {
        "import": stamps["imported"] - stamps["entry"],
        "keys": stamps["keys"] - stamps["imported"],
        "read_verify": read - decrypted,
        "decrypt": decrypted,
        "session": stamps["runtime"] - init_started[0] - golden,
        "golden": golden,
        "first_answer": stamps["answered"] - stamps["runtime"],
        "child_total": stamps["answered"] - stamps["entry"],
    }
    return {
        "label": answer.label,
        "source": answer.source,
        "golden_checks": len(runtime.manifest.raw.get("golden") or []),
        "golden_failures": len(runtime.golden_failures),
        "breakdown_ms": breakdown,
    }


def run_plain_child(spec: dict) -> dict:
    """Load the plaintext model with ONNX Runtime, answer the query and return the timings."""
    stamps = {"entry": CHILD_ENTRY_MS}
    import json

    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer
    stamps["imported"] = now_ms()

    # Labels and max_length would ship beside a plaintext model, so the parent copies them from
    # the package manifest into a small JSON file.
    with open(spec["labels_file"], encoding="utf-8") as handle:
        model_info = json.load(handle)
    labels = model_info["labels"]
    stamps["read"] = now_ms()

    tokenizer = Tokenizer.from_file(spec["tokenizer"])
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=model_info["max_length"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(spec["model_onnx"], sess_options=options,
                                   providers=["CPUExecutionProvider"])
    stamps["session"] = now_ms()

    encoding = tokenizer.encode(spec["query"])
    feeds = {
        "input_ids": np.asarray([encoding.ids], dtype=np.int64),  # (1, seq)
        "attention_mask": np.asarray([encoding.attention_mask], dtype=np.int64),  # (1, seq)
    }
    (logits,) = session.run([model_info["output_name"]], feeds)
    label = labels[int(logits[0].argmax())]
    stamps["answered"] = now_ms()

    breakdown = {
        "import": stamps["imported"] - stamps["entry"],
        "read_verify": stamps["read"] - stamps["imported"],
        "session": stamps["session"] - stamps["read"],
        "first_answer": stamps["answered"] - stamps["session"],
        "child_total": stamps["answered"] - stamps["entry"],
    }
    return {"label": label, "source": "plain", "breakdown_ms": breakdown}


def child_main(spec_json: str) -> int:
    import json

    spec = json.loads(spec_json)
    runner = run_edge_child if spec["variant"] == "edge" else run_plain_child
    result = runner(spec)
    result["entry_ms"] = CHILD_ENTRY_MS
    print(json.dumps(result), flush=True)
    return 0


# Parent mode: spawn the children, collect and report.


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import os
    import tempfile
    from pathlib import Path

    repo_root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo_root))
    from edge_runtime.package import inspect_package

    parser = argparse.ArgumentParser(
        description="Time cold start to the first answer: an encrypted edge_runtime package "
                    "against plain ONNX Runtime on the same model, each in a fresh process.")
    parser.add_argument("--package", default="models/clinc150-student.edgepkg",
                        help="signed, encrypted student package (default: %(default)s)")
    parser.add_argument("--model-onnx",
                        help="the package's model as a plaintext .onnx file (default: "
                             "decrypted from --package into a temporary folder)")
    parser.add_argument("--tokenizer",
                        help="tokenizer.json for the plain variant (default: taken from "
                             "--package with the model)")
    parser.add_argument("--signer-key", default="models/keys/demo-signer.pub.pem",
                        help="trusted signer public key PEM (default: %(default)s)")
    parser.add_argument("--device-key", default="models/keys/demo-device.key.pem",
                        help="device private key PEM that unwraps the content key "
                             "(default: %(default)s)")
    parser.add_argument("--query", default=DEFAULT_QUERY,
                        help="the first query both variants answer (default: %(default)r)")
    parser.add_argument("--runs", type=int, default=15,
                        help="timed runs per variant (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs per variant first, to fill the page cache "
                             "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads in both variants "
                             "(default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs is {args.runs}; pass 1 or more")
    if args.warmup < 0:
        parser.error(f"--warmup is {args.warmup}; pass 0 or more")

    if (args.model_onnx is None) != (args.tokenizer is None):
        parser.error("pass --model-onnx and --tokenizer together, or neither to take both "
                     "from --package")
    names = ["package", "signer_key", "device_key"]
    if args.model_onnx is not None:
        names += ["model_onnx", "tokenizer"]
    paths = {name: Path(getattr(args, name)).resolve() for name in names}
    missing = [f"--{name.replace('_', '-')} {path}" for name, path in paths.items()
               if not path.is_file()]
    if missing:
        print(f"error: file not found: {'; '.join(missing)}. Pass existing files, or build "
              "the models with `make models`", file=sys.stderr)
        return 2

    manifest = inspect_package(paths["package"])["manifest"]
    with tempfile.TemporaryDirectory(prefix="cold-start-") as scratch:
        if args.model_onnx is None:
            paths.update(extract_plaintext(paths, Path(scratch)))
        problem = check_same_model(manifest, str(paths["model_onnx"]))
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        labels_file = Path(scratch) / "labels.json"
        labels_file.write_text(json.dumps({
            "labels": manifest["labels"],
            "max_length": manifest["model"]["max_length"],
            "output_name": manifest["model"]["outputs"][0],
        }), encoding="utf-8")
        base_spec = {
            "repo_root": str(repo_root), "query": args.query, "threads": args.threads,
            "package": str(paths["package"]), "signer_key": str(paths["signer_key"]),
            "device_key": str(paths["device_key"]),
            "state_file": str(Path(scratch) / "accepted-versions.json"),
            "model_onnx": str(paths["model_onnx"]), "tokenizer": str(paths["tokenizer"]),
            "labels_file": str(labels_file),
            "pycache": str(Path(scratch) / "pycache"),
        }
        load_before = os.getloadavg()
        runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
        for index in range(args.warmup + args.runs):
            # Alternate which variant goes first, so that neither always follows the other.
            order = VARIANTS if index % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                result = time_child(variant, base_spec)
                if index >= args.warmup:
                    runs[variant].append(result)
            print(f"run {index + 1 - args.warmup}/{args.runs}" if index >= args.warmup
                  else f"warm-up {index + 1}/{args.warmup}", file=sys.stderr)
        load_after = os.getloadavg()

    summary = summarize(runs)
    labels = {variant: sorted({run["label"] for run in runs[variant]}) for variant in VARIANTS}
    report = {
        "benchmark": "cold start to the first answer",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "query": args.query,
        "threads": args.threads,
        "runs": args.runs,
        "warmup": args.warmup,
        "inputs": {name: str(path) for name, path in paths.items()},
        "package": {"name": manifest.get("name"), "version": manifest.get("version"),
                    "encrypted_members": sorted((manifest.get("encryption") or {})
                                                .get("members") or {})},
        "machine": machine_info(),
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "answers": labels,
        "edge_golden_failures": max(run.get("golden_failures", 0) for run in runs["edge"]),
        "summary_ms": summary,
        "ratio_of_median_wall": summary["edge"]["wall"]["median"]
        / summary["plain"]["wall"]["median"],
        "runs_ms": {variant: [run["breakdown_ms"] for run in runs[variant]]
                    for variant in VARIANTS},
    }
    print(format_markdown(report))
    if labels["edge"] != labels["plain"]:
        print(f"warning: the variants answered differently: {labels}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def extract_plaintext(paths: dict, scratch) -> dict:
    """Decrypt the package with the device key and write its model and tokenizer to scratch.

    Returns the paths of the two files. Only the benchmark does this: a device never writes
    the plaintext model to disk.
    """
    from edge_runtime import encryption, signing
    from edge_runtime.package import TrustPolicy, read_package

    signer_public = signing.load_public_key_pem(paths["signer_key"].read_bytes())
    trust = TrustPolicy(trusted_keys=(signer_public,),
                        device_key=encryption.load_private_key(paths["device_key"]))
    package = read_package(paths["package"], trust)
    files = {"model_onnx": scratch / "model.onnx", "tokenizer": scratch / "tokenizer.json"}
    files["model_onnx"].write_bytes(package.model_bytes)
    files["tokenizer"].write_text(package.tokenizer_json, encoding="utf-8")
    return files


def check_same_model(manifest: dict, model_onnx: str) -> str | None:
    """Return a message when the plaintext .onnx differs from the package's model, else None."""
    from edge_runtime.package import sha256_hex

    member = manifest["model"]["member"]
    encryption = manifest.get("encryption") or {}
    expected = (encryption.get("plaintext_sha256") or {}).get(member)
    if expected is None:
        expected = manifest["members"][member]["sha256"]
    with open(model_onnx, "rb") as handle:
        actual = sha256_hex(handle.read())
    if actual != expected:
        return (f"{model_onnx} has sha256 {actual}, but the package's {member} has {expected}; "
                "pass the plaintext model of the same build")
    return None


def time_child(variant: str, base_spec: dict) -> dict:
    """Spawn one child, time it to its answer line and return its result with the wall time."""
    import json
    import os
    import subprocess
    import tempfile

    spec = dict(base_spec, variant=variant)
    command = [sys.executable, __file__, CHILD_FLAG, json.dumps(spec)]
    # Installed packages ship compiled bytecode; let the children cache theirs in scratch.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = spec["pycache"]
    # stderr goes to a file, because a full stderr pipe would block the child before it answers.
    with tempfile.TemporaryFile(mode="w+") as stderr_file:
        spawned = now_ms()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr_file, text=True,
                                 env=env)
        line = child.stdout.readline()
        answered = now_ms()
        child.communicate(timeout=300)
        stderr_file.seek(0)
        stderr = stderr_file.read()
    if child.returncode != 0 or not line:
        raise SystemExit(f"error: the {variant} child failed with exit code {child.returncode}:"
                         f"\n{stderr}")
    result = json.loads(line)
    result["breakdown_ms"]["wall"] = answered - spawned
    if SHARED_CLOCK:
        result["breakdown_ms"]["startup"] = result["entry_ms"] - spawned
    return result


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Return the median and p95 of each stage per variant, for the stages it has."""
    import statistics

    summary = {}
    for variant, results in runs.items():
        summary[variant] = {}
        for stage in STAGES:
            if stage not in results[0]["breakdown_ms"]:
                continue
            values = [run["breakdown_ms"][stage] for run in results]
            summary[variant][stage] = {"median": statistics.median(values),
                                       "p95": percentile(values, 95.0)}
    return summary


def percentile(values: list[float], q: float) -> float:
    """Return the q-th percentile with linear interpolation between the closest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def machine_info() -> dict:
    import os
    import platform

    import onnxruntime

    from edge_runtime.bench import this_cpu

    return {"cpu": this_cpu()["cpu_model"], "logical_cpus": os.cpu_count(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "platform": platform.platform()}


def format_markdown(report: dict) -> str:
    summary = report["summary_ms"]
    edge, plain = summary["edge"], summary["plain"]
    lines = [
        f"Cold start to the first answer, {report['runs']} runs per variant, "
        f"{report['threads']} intra-op thread(s), {report['machine']['cpu']}",
        "",
        "| variant | median ms | p95 ms |",
        "|---|---:|---:|",
        f"| edge_runtime, signed + encrypted package | {edge['wall']['median']:.1f} | "
        f"{edge['wall']['p95']:.1f} |",
        f"| plain ONNX Runtime, plaintext .onnx | {plain['wall']['median']:.1f} | "
        f"{plain['wall']['p95']:.1f} |",
        "",
        f"Ratio of medians (edge / plain): {report['ratio_of_median_wall']:.2f}",
        "",
        "| stage, median ms | edge | plain |",
        "|---|---:|---:|",
    ]
    for stage in STAGES:
        cells = [f"{side[stage]['median']:.1f}" if stage in side else "n/a"
                 for side in (edge, plain)]
        lines.append(f"| {stage} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == CHILD_FLAG:
        sys.exit(child_main(sys.argv[2]))
    sys.exit(main())
