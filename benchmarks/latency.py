"""Single-query latency of the teacher and the student, fp32 and int8, in one run.

Reads the ONNX files and the tokenizer that ``python -m export build`` writes to its output
folder, creates one ONNX Runtime session per model with 1 intra-op thread, and times
``session.run`` on one real query at a time (pre-tokenized, no padding) after a warm-up.
Models take turns in blocks of consecutive queries (``--rounds`` blocks each), so that a change
in machine load hits all of them alike. Turns are not query by query, because then the 90 MB
teacher evicts the student's weights from the CPU caches before every student query, which a
device running only the student never sees.

    python benchmarks/latency.py --build-dir build/clinc150 [--queries 1000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_runtime.bench import this_cpu  # noqa: E402
from edge_runtime.data import load_split  # noqa: E402

MODELS = ("teacher-fp32", "teacher-int8", "student-fp32", "student-int8")


def make_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def encode_all(tokenizer: Tokenizer, texts: list[str]) -> list[dict[str, np.ndarray]]:
    """Encode each text as one unpadded (1, seq) feed."""
    feeds = []
    for text in texts:
        encoding = tokenizer.encode(text)
        feeds.append({
            "input_ids": np.asarray([encoding.ids], dtype=np.int64),  # (1, seq)
            "attention_mask": np.asarray([encoding.attention_mask], dtype=np.int64),
        })
    return feeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", default="build/clinc150",
                        help="output folder of the export build (default: %(default)s)")
    parser.add_argument("--data", default="../shared/data/clinc150",
                        help="data set whose test split supplies the queries")
    parser.add_argument("--queries", type=int, default=1000,
                        help="timed queries per model (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=100,
                        help="untimed queries per model at the start of each block "
                             "(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="blocks per model, taken in turn (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads (default: %(default)s)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    build_dir = Path(args.build_dir)
    missing = [m for m in MODELS if not (build_dir / f"{m}.onnx").is_file()]
    if missing:
        print(f"error: {build_dir} lacks {', '.join(m + '.onnx' for m in missing)}; run "
              "`python -m export build --config export/configs/clinc150.toml` first",
              file=sys.stderr)
        return 2

    tokenizer = Tokenizer.from_file(str(build_dir / "tokenizer.json"))
    tokenizer.no_padding()
    texts = [e.text for e in load_split(args.data, "test")]
    rng = np.random.default_rng(0)
    picked = [texts[i] for i in rng.choice(len(texts), size=args.queries + args.warmup)]
    feeds = encode_all(tokenizer, picked)
    model_feeds = {m: feeds for m in MODELS}
    # A build with student.trim_vocabulary writes the student's own tokenizer, which both
    # student models read because the build trims the vocabulary before distillation.
    # NOTE: builds made before that change trimmed only student-int8.onnx, so their fp32
    # student needs tokenizer.json and fails here with an out-of-range token id.
    trimmed = build_dir / "student-tokenizer.json"
    if trimmed.is_file():
        student_tokenizer = Tokenizer.from_file(str(trimmed))
        student_tokenizer.no_padding()
        student_feeds = encode_all(student_tokenizer, picked)
        model_feeds["student-fp32"] = model_feeds["student-int8"] = student_feeds
    start = time.perf_counter()
    for text in picked[: args.queries]:
        tokenizer.encode(text)
    tokenize_us = (time.perf_counter() - start) / args.queries * 1e6

    sessions = {m: make_session(build_dir / f"{m}.onnx", args.threads) for m in MODELS}
    timings: dict[str, list[float]] = {m: [] for m in MODELS}
    timed = len(feeds) - args.warmup
    block = max(1, timed // args.rounds)
    for first in range(0, timed, block):
        for model, session in sessions.items():
            warmup_feeds = model_feeds[model][: args.warmup]
            timed_feeds = model_feeds[model][args.warmup:]
            for feed in warmup_feeds[: max(1, args.warmup // args.rounds)]:
                session.run(["logits"], feed)
            for feed in timed_feeds[first:first + block]:
                begin = time.perf_counter()
                session.run(["logits"], feed)
                timings[model].append((time.perf_counter() - begin) * 1000.0)  # milliseconds

    results = {}
    for model in MODELS:
        values = np.asarray(timings[model])
        results[model] = {
            "median_ms": float(np.median(values)),
            "p95_ms": float(np.percentile(values, 95)),
            "size_mb": (build_dir / f"{model}.onnx").stat().st_size / 1e6,
        }
    ratio = results["teacher-fp32"]["median_ms"] / results["student-int8"]["median_ms"]
    mean_tokens = float(np.mean([f["input_ids"].shape[1] for f in feeds]))
    cpu = this_cpu()
    machine = {
        "cpu": cpu["cpu_model"], "isa_flags": cpu["isa_flags"], "cores": os.cpu_count(),
        "machine": platform.machine(), "python": platform.python_version(),
        "onnxruntime": ort.__version__,
    }

    print(f"{args.queries} queries per model in {args.rounds} blocks, each after a warm-up, "
          f"{args.threads} thread(s), "
          f"mean {mean_tokens:.1f} tokens; tokenization {tokenize_us:.0f} us per query")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, onnxruntime "
          f"{machine['onnxruntime']}")
    print("| model | median ms | p95 ms | size MB |")
    print("| --- | --- | --- | --- |")
    for model, figures in results.items():
        print(f"| {model} | {figures['median_ms']:.3f} | {figures['p95_ms']:.3f} | "
              f"{figures['size_mb']:.1f} |")
    print(f"teacher fp32 median / student int8 median = {ratio:.1f}x")

    if args.json:
        Path(args.json).write_text(json.dumps({
            "queries": args.queries, "warmup": args.warmup, "rounds": args.rounds,
            "threads": args.threads,
            "mean_tokens": mean_tokens, "tokenize_us": tokenize_us, "machine": machine,
            "models": results, "teacher_fp32_over_student_int8": ratio,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
