"""The ``edge-runtime`` command line: demo, ask, eval, bench, gateway, api-key, keys, package,
watermark and bundle."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator

from edge_runtime import bench, bundle, package_cli, watermark_cli
from edge_runtime.data import DATA_FORMATS
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.package_cli import add_trust_options, trust_from_args
from edge_runtime.runtime import ROUTE_PREFER_LOCAL, ROUTES, EdgeRuntime

DEFAULT_STUDENT_PACKAGE = "models/clinc150-student.edgepkg"
DEFAULT_TEACHER_PACKAGE = "models/clinc150-teacher.edgepkg"

# Varied queries for the demo: clear in-scope requests, vaguer ones the student is less sure
# of, and out-of-scope questions that belong to no intent.
DEMO_QUERIES = [
    "what's the weather going to be like in boston tomorrow",
    "set an alarm for 6:30 am",
    "transfer 200 dollars from checking to savings",
    "how do you say thank you in japanese",
    "book me a flight to denver next friday",
    "what is my current bank balance",
    "i want to know more about my money situation",
    "can you help me with the thing from yesterday",
    "is it going to be a problem if i go now",
    "what should i do about my card",
    "who won the world cup in 1998",
    "how do i bake sourdough bread at home",
    "tell me the plot of hamlet",
    "what is the boiling point of mercury",
]


def positive_int(value: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return number


def port_number(value: str) -> int:
    """argparse type: a TCP port, 0 to 65535."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port; use 0 to 65535")
    return number


def timeout_seconds(value: str) -> float:
    """argparse type: a positive, finite number of seconds, at most one hour."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 < number <= 3600:
        raise argparse.ArgumentTypeError(f"{value} must be above 0 and at most 3600 seconds")
    return number


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--package", default=DEFAULT_STUDENT_PACKAGE,
                        help="student package (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="ONNX Runtime intra-op threads (default: %(default)s)")
    parser.add_argument("--timeout", type=timeout_seconds, default=2.0,
                        help="teacher read timeout in seconds (default: %(default)s)")
    add_trust_options(parser)


def _add_teacher_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--teacher-url",
                       help="gateway base URL, for example http://127.0.0.1:8080")
    group.add_argument("--teacher-package", default=DEFAULT_TEACHER_PACKAGE,
                       help="start a gateway on loopback serving this package "
                            "(default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-runtime",
        description="On-device intent classification with a cloud teacher fallback.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="start a gateway and answer example queries")
    _add_runtime_options(demo)
    demo.add_argument("--teacher-package", default=DEFAULT_TEACHER_PACKAGE,
                      help="teacher package the demo gateway serves (default: %(default)s)")

    ask = commands.add_parser("ask", help="answer one query")
    ask.add_argument("text", help="the query")
    _add_runtime_options(ask)
    ask.add_argument("--teacher-url", help="gateway base URL; without it, answers stay local")
    ask.add_argument("--debug", action="store_true",
                     help="include the calibrated score and the top probabilities")
    ask.add_argument("--json", action="store_true", help="print the answer as JSON")
    ask.add_argument("--route", choices=ROUTES, default=ROUTE_PREFER_LOCAL,
                     help="which path may answer (default: %(default)s; see docs/runtime.md)")
    ask.add_argument("--escalation-log", metavar="PATH",
                     help="record the query in this escalation log if it is escalated "
                          "(SQLite; personal data redacted; see docs/escalation-log.md)")

    evaluate = commands.add_parser("eval", help="evaluate a data split through the cascade")
    evaluate.add_argument("--data", required=True,
                          help="data set folder, or one data file (.json, .csv or .jsonl)")
    evaluate.add_argument("--split", default="test",
                          help="split name: the key of a CLINC150 file, or <split>.csv or "
                               "<split>.jsonl in a folder (default: %(default)s)")
    evaluate.add_argument("--format", choices=DATA_FORMATS, default="auto",
                          help="data format; auto picks it from the file names "
                               "(default: %(default)s)")
    evaluate.add_argument("--text-field", help="CSV column or JSON key of the text "
                                               "(default: text)")
    evaluate.add_argument("--label-field",
                          help="CSV column or JSON key of the label (default: label, or "
                               "category for a CSV file that has that column)")
    evaluate.add_argument("--limit", type=positive_int, default=None,
                          help="evaluate only the first N queries in file order (default: all)")
    evaluate.add_argument("--json", action="store_true", help="print the figures as JSON")
    evaluate.add_argument("--escalation-log", metavar="PATH",
                          help="record every escalated query of the run in this escalation "
                               "log, for the next training round")
    _add_runtime_options(evaluate)
    _add_teacher_options(evaluate)

    _add_bench_parser(commands)

    gateway = commands.add_parser(
        "gateway", help="serve a teacher over HTTP",
        description="Serve a teacher over HTTP. Settings come from --config (see "
                    "examples/gateway.toml), then EDGE_GATEWAY__SECTION__KEY environment "
                    "variables, then the options below.")
    gateway.add_argument("--config", metavar="TOML",
                         help="gateway config file (default: $EDGE_GATEWAY_CONFIG, else "
                              f"built-in defaults: the onnx teacher {DEFAULT_TEACHER_PACKAGE}, "
                              "no API keys, in-memory rate limits)")
    gateway.add_argument("--package", help="teacher package; sets teacher.package")
    gateway.add_argument("--host", help="bind address; sets server.host (default 127.0.0.1)")
    gateway.add_argument("--port", type=port_number,
                         help="TCP port, 0 picks a free one; sets server.port (default 8080)")
    gateway.add_argument("--threads", type=positive_int,
                         help="ONNX Runtime intra-op threads; sets server.threads (default 1)")
    gateway.add_argument("--signer-key", action="append", default=[], metavar="PEM",
                         help="trusted signer public key of the teacher package; repeat for "
                              "several; replaces teacher.signer_keys (default: the demo key)")
    gateway.add_argument("--allow-unsigned", action="store_true",
                         help="accept an unsigned teacher package (development only)")
    gateway.add_argument("--no-rate-limit", action="store_true",
                         help="turn rate limits off, for evaluation and load tests on loopback")

    api_key = commands.add_parser("api-key", help="create API keys for gateway clients")
    api_key_commands = api_key.add_subparsers(dest="api_key_command", required=True)
    create = api_key_commands.add_parser(
        "create", help="print a new API key once, and the [[keys]] entry for the config")
    create.add_argument("--id", required=True, help="public key id, written to logs")
    create.add_argument("--tenant", required=True, help="tenant the key belongs to")
    create.add_argument("--tier", required=True, help="rate limit tier, defined in [tiers]")
    create.add_argument("--config", metavar="TOML",
                        help="check the tier and id against this gateway config")

    package_cli.add_commands(commands)
    watermark_cli.add_commands(commands)
    bundle.add_command(commands)
    return parser


def _add_bench_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bench", help="measure cold start, latency, throughput and memory of a package",
        description="Measure how fast a package loads and runs on this machine: cold start in "
                    "fresh processes, warm single-query latency, batch throughput, peak memory, "
                    "sizes and the CPU. Prints tables, or one JSON record with --json.")
    parser.add_argument("package", nargs="?", default=DEFAULT_STUDENT_PACKAGE,
                        help="package to measure (default: %(default)s)")

    parser.add_argument("--runs", type=positive_int, default=bench.DEFAULT_RUNS,
                        help="single queries timed per thread count; also the minimum number "
                             "of queries per throughput measurement (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=bench.DEFAULT_WARMUP,
                        help="untimed single queries before each latency measurement "
                             "(default: %(default)s)")
    parser.add_argument("--cold-runs", type=positive_int, default=bench.DEFAULT_COLD_RUNS,
                        help="timed cold starts, each in a fresh process, after one untimed "
                             "warm-up process (default: %(default)s)")
    parser.add_argument("--threads", type=bench.positive_int_list, default=bench.DEFAULT_THREADS,
                        help="comma-separated ONNX Runtime intra-op thread counts, capped at "
                             "the usable CPUs; cold starts use the first (default: %(default)s)")

    parser.add_argument("--batch-sizes", type=bench.positive_int_list,
                        default=bench.DEFAULT_BATCH_SIZES,
                        help="comma-separated batch sizes for throughput (default: %(default)s)")

    parser.add_argument("--inter-op-threads", type=positive_int, default=1,
                        help="ONNX Runtime inter-op threads; above 1 runs graph nodes in "
                             "parallel (default: %(default)s)")
    parser.add_argument("--graph-optimization", default="all", metavar="LEVEL",
                        help="ONNX Runtime graph optimization: disable, basic, extended or all "
                             "(default: %(default)s)")
    parser.add_argument("--providers", type=bench.name_list, default=None,
                        help="comma-separated execution providers in order of preference; "
                             "missing ones are dropped and CPUExecutionProvider is the fallback "
                             "(default: CPUExecutionProvider)")

    parser.add_argument("--queries", metavar="FILE",
                        help="UTF-8 text file with one query per line (default: a built-in "
                             "list of varied English requests)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON record instead of the tables")
    add_trust_options(parser)


@contextlib.contextmanager
def _teacher_url(args: argparse.Namespace) -> Iterator[str]:
    """Yield the teacher URL given on the command line, or start a gateway for the run."""
    if getattr(args, "teacher_url", None):
        yield args.teacher_url
        return
    from edge_runtime.gateway.server import running_gateway

    print(f"starting a gateway for {args.teacher_package} on loopback ...", file=sys.stderr)
    with running_gateway(args.teacher_package, signer_keys=tuple(args.signer_key)) as gateway:
        print(f"gateway listening on {gateway.url}", file=sys.stderr)
        yield gateway.url


def run_demo(args: argparse.Namespace) -> int:
    with _teacher_url(args) as url:
        # No answer cache: the warm-up query is shown again and must take its real path.
        with EdgeRuntime.load(args.package, teacher_url=url, api_key=teacher_api_key(),
                              threads=args.threads, read_timeout=args.timeout,
                              trust=trust_from_args(args), answer_cache=False) as runtime:
            runtime.answer(DEMO_QUERIES[0])  # warm-up, not shown
            runtime.teacher.healthy()  # opens the connection, so no row pays for it
            answers = [(query, runtime.answer(query)) for query in DEMO_QUERIES]
    width = max(len(q) for q in DEMO_QUERIES)
    print(f"{'query':<{width}}  {'answer':<22} {'source':<13} {'ms':>6}")
    print("-" * (width + 45))
    for query, answer in answers:
        print(f"{query:<{width}}  {answer.label:<22} {answer.source:<13} "
              f"{answer.timings_ms['total']:6.2f}")
    sources = Counter(answer.source for _, answer in answers)
    local_ms = sorted(a.timings_ms["total"] for _, a in answers if a.source == "local")
    teacher_ms = sorted(a.timings_ms["total"] for _, a in answers if a.source == "teacher")
    median = lambda values: values[len(values) // 2] if values else float("nan")  # noqa: E731
    print(
        f"{len(answers)} queries: {sources['local']} local (median {median(local_ms):.2f} ms), "
        f"{sources['teacher']} teacher (median {median(teacher_ms):.2f} ms), "
        f"{sources['local-offline']} local-offline"
    )
    return 0


def _escalation_log(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """Open the --escalation-log file, or return a context that yields None."""
    if not args.escalation_log:
        return contextlib.nullcontext()
    from edge_runtime.escalation_log import EscalationLog

    return EscalationLog(args.escalation_log)


def run_ask(args: argparse.Namespace) -> int:
    with _escalation_log(args) as escalations, \
            EdgeRuntime.load(args.package, teacher_url=args.teacher_url,
                             api_key=teacher_api_key(), threads=args.threads,
                             read_timeout=args.timeout, debug=args.debug,
                             trust=trust_from_args(args), route=args.route,
                             escalation_log=escalations) as runtime:
        answer = runtime.answer(args.text)
    if args.json:
        body = {"label": answer.label, "source": answer.source,
                "timings_ms": {k: round(v, 3) for k, v in answer.timings_ms.items()}}
        if answer.debug is not None:
            body["debug"] = answer.debug
        print(json.dumps(body, indent=2))
        return 0
    print(f"{answer.label}  ({answer.source}, {answer.timings_ms['total']:.2f} ms)")
    if answer.debug is not None:
        top = sorted(answer.debug["probabilities"].items(), key=lambda kv: -kv[1])[:5]
        print(f"{answer.debug['score_kind']} {answer.debug['score']:.4f}, "
              f"threshold {answer.debug['threshold']:.4f}")
        width = max(len(label) for label, _ in top)
        for label, probability in top:
            print(f"  {label:<{width}}  {probability:.4f}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from edge_runtime.data import load_examples
    from edge_runtime.evaluate import evaluate, format_report
    from edge_runtime.teacher_client import TeacherClient

    examples = load_examples(args.data, args.split, args.format, args.text_field,
                             args.label_field)
    if args.limit is not None:
        examples = examples[: args.limit]
    with _teacher_url(args) as url:
        teacher = TeacherClient(url, api_key=teacher_api_key(), read_timeout=args.timeout)
        # The answer cache stays off: eval measures the models, and a cached repeat would
        # count as neither local nor teacher.
        with _escalation_log(args) as escalations, \
                EdgeRuntime.load(args.package, teacher_url=url, api_key=teacher_api_key(),
                                 threads=args.threads, read_timeout=args.timeout,
                                 trust=trust_from_args(args), answer_cache=False,
                                 escalation_log=escalations) as runtime:
            result = evaluate(runtime, teacher, examples, progress=True)
        teacher.close()
    result["data"] = {"path": args.data, "split": args.split, "format": args.format,
                      "limit": args.limit}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_report(result))
    return 0


def run_bench(args: argparse.Namespace) -> int:
    report = bench.run_benchmark(bench.settings_from_args(args))
    print(json.dumps(report, indent=2) if args.json else bench.format_table(report))
    return 0


API_KEY_ENV = "EDGE_RUNTIME_API_KEY"
CONFIG_ENV = "EDGE_GATEWAY_CONFIG"  # path of the gateway config when --config is not given


def teacher_api_key() -> str | None:
    """Return the gateway API key from EDGE_RUNTIME_API_KEY, or None. It is read from the
    environment because a command-line argument is visible to every user of the machine."""
    return os.environ.get(API_KEY_ENV) or None


def run_gateway(args: argparse.Namespace) -> int:
    import dataclasses

    from edge_runtime.gateway.config import (
        BUILT_IN_SOURCE,
        load_gateway_config,
        parse_gateway_config,
    )
    from edge_runtime.gateway.server import serve

    config_path = args.config or os.environ.get(CONFIG_ENV)
    if config_path:
        config = load_gateway_config(config_path)
    else:  # the built-in defaults, still with the EDGE_GATEWAY__SECTION__KEY overrides
        config = parse_gateway_config({}, source=BUILT_IN_SOURCE)
    server = {name: getattr(args, name) for name in ("host", "port", "threads")
              if getattr(args, name) is not None}
    teacher: dict = {}
    if args.package is not None:
        teacher.update(backend="onnx", package=args.package)
    if args.signer_key:
        teacher["signer_keys"] = tuple(args.signer_key)
    if args.allow_unsigned:
        teacher["allow_unsigned"] = True
    config = dataclasses.replace(
        config,
        server=dataclasses.replace(config.server, **server),
        teacher=dataclasses.replace(config.teacher, **teacher),
        rate_limit=dataclasses.replace(config.rate_limit,
                                       enabled=config.rate_limit.enabled
                                       and not args.no_rate_limit),
    )
    serve(config)
    return 0


def run_api_key(args: argparse.Namespace) -> int:
    from edge_runtime.gateway import keys as gateway_keys

    argv = ["create", "--id", args.id, "--tenant", args.tenant, "--tier", args.tier]
    if args.config:
        argv += ["--config", args.config]
    return gateway_keys.main(argv)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    handlers = {"demo": run_demo, "ask": run_ask, "eval": run_eval, "bench": run_bench,
                "gateway": run_gateway,
                "api-key": run_api_key, "keys": package_cli.run_keys,
                "package": package_cli.run_package, "watermark": watermark_cli.run,
                "bundle": bundle.run}
    try:
        return handlers[args.command](args)
    except (EdgeRuntimeError, OSError) as exc:
        print(f"edge-runtime {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
