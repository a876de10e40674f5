"""An application that embeds edge_runtime: it loads the model package once at start, answers
queries, counts the answers by source and shuts down cleanly.

    python examples/embedding_app.py < queries.txt
    python examples/embedding_app.py --queries queries.txt --teacher-url http://127.0.0.1:8080

Queries are read one per line from standard input, or from ``--queries``. Each answer is printed
as soon as it is ready, as one tab-separated line: label, source, milliseconds, query. The source
is ``local`` (the student on this device), ``teacher`` (the gateway), ``cache`` (a teacher answer
kept on the device) or ``local-offline`` (the student, because the teacher was needed but did
not answer). At the end of the input, or on SIGINT or SIGTERM, the app closes the runtime and
prints how many answers came from each source. Log lines go to standard error.

The defaults are the demo package and the demo keys in ``models/``, which are public and protect
nothing: pass your own with ``--package``, ``--signer-key`` and ``--device-key``. A gateway API
key is read from ``EDGE_RUNTIME_API_KEY``, never from the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from edge_runtime import (
    SOURCE_CACHE,
    SOURCE_LOCAL,
    SOURCE_LOCAL_OFFLINE,
    SOURCE_TEACHER,
    EdgeRuntime,
    EdgeRuntimeError,
    RollbackState,
    TrustPolicy,
    encryption,
    signing,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PACKAGE = ROOT / "models" / "clinc150-student.edgepkg"
DEFAULT_SIGNER_KEY = ROOT / "models" / "keys" / "demo-signer.pub.pem"
DEFAULT_DEVICE_KEY = ROOT / "models" / "keys" / "demo-device.key.pem"
DEFAULT_STATE_FILE = (
    Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    / "edge-runtime"
    / "accepted-versions.json"
)
API_KEY_ENV = "EDGE_RUNTIME_API_KEY"
SOURCES = (SOURCE_LOCAL, SOURCE_TEACHER, SOURCE_CACHE, SOURCE_LOCAL_OFFLINE)
FAILED = "failed"  # queries the runtime raised an error for

log = logging.getLogger("embedding_app")


class Shutdown(BaseException):
    """Raised by the SIGINT and SIGTERM handlers in the main thread.

    A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` between the
    handler and ``main`` can swallow it.
    """

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


def _request_shutdown(signum: int, frame: object) -> None:
    # A second signal during the shutdown ends the process at once.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Shutdown(signal.Signals(signum).name)


def load_trust(signer_key: Path, device_key: Path, state_file: str) -> TrustPolicy:
    """Build the trust policy: whose signatures to accept, the key that decrypts the model,
    and where accepted versions are recorded (an empty ``state_file`` skips that check)."""
    trusted = [signing.load_public_key_pem(signer_key.read_bytes())]
    return TrustPolicy(
        trusted_keys=trusted,
        device_key=encryption.load_private_key(device_key),
        rollback=RollbackState(state_file) if state_file else None,
    )


@contextlib.contextmanager
def open_queries(path: str | None) -> Iterator[Iterable[str]]:
    if path is None:
        yield sys.stdin
        return
    with open(path, encoding="utf-8") as handle:
        yield handle


def answer_queries(
    runtime: EdgeRuntime, lines: Iterable[str], out: TextIO, counts: Counter[str]
) -> None:
    """Answer each non-empty line, print the answer and count it by source in ``counts``."""
    for number, line in enumerate(lines, start=1):
        query = line.strip()
        if not query:
            continue
        try:
            answer = runtime.answer(query)
        except EdgeRuntimeError as exc:
            # An invalid query (ConfigError) or no usable answer at all (TeacherError): the
            # app reports it and goes on with the next query.
            counts[FAILED] += 1
            log.error("query on line %d failed: %s: %s", number, type(exc).__name__, exc)
            continue
        counts[answer.source] += 1
        print(
            f"{answer.label}\t{answer.source}\t{answer.timings_ms['total']:.2f}\t{query}",
            file=out,
            flush=True,
        )


def format_counts(counts: Counter[str]) -> str:
    answered = sum(counts[source] for source in SOURCES)
    by_source = ", ".join(f"{counts[source]} {source}" for source in SOURCES)
    return f"{answered} answered ({by_source}); {counts[FAILED]} failed"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Answer queries, one per line, with an edge_runtime model package."
    )
    parser.add_argument(
        "--package",
        type=Path,
        default=DEFAULT_PACKAGE,
        help="student package (default: %(default)s)",
    )
    parser.add_argument(
        "--signer-key",
        type=Path,
        default=DEFAULT_SIGNER_KEY,
        help="trusted signer public key, PEM (default: the demo key)",
    )
    parser.add_argument(
        "--device-key",
        type=Path,
        default=DEFAULT_DEVICE_KEY,
        help="this device's private key, PEM (default: the demo key)",
    )
    parser.add_argument(
        "--state-file",
        default=str(DEFAULT_STATE_FILE),
        help="rollback state file that records accepted package versions; "
        "'' skips the rollback check (default: %(default)s)",
    )
    parser.add_argument(
        "--teacher-url",
        default=None,
        help="gateway base URL, for example http://127.0.0.1:8080; without it "
        "every answer is local",
    )
    parser.add_argument(
        "--teacher-timeout",
        type=float,
        default=2.0,
        help="seconds to wait for each teacher response (default: %(default)s)",
    )
    parser.add_argument(
        "--queries",
        default=None,
        help="UTF-8 file with one query per line (default: standard input)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    signal.signal(signal.SIGINT, _request_shutdown)
    signal.signal(signal.SIGTERM, _request_shutdown)

    counts: Counter[str] = Counter()
    try:
        trust = load_trust(args.signer_key, args.device_key, args.state_file)
        # Load once: verifying, decrypting and creating the session is the slow part.
        with EdgeRuntime.load(
            args.package,
            teacher_url=args.teacher_url,
            api_key=os.environ.get(API_KEY_ENV) or None,
            read_timeout=args.teacher_timeout,
            trust=trust,
        ) as runtime:
            log.info(
                "loaded %s version %d (%d labels); teacher %s",
                runtime.manifest.name,
                runtime.manifest.version,
                len(runtime.manifest.labels),
                args.teacher_url or "not configured",
            )
            try:
                with open_queries(args.queries) as lines:
                    answer_queries(runtime, lines, sys.stdout, counts)
                log.info("end of input")
            finally:
                # Leaving the with block closes the runtime, also on a signal or an error.
                log.info("closing the runtime")
    except Shutdown as stop:
        log.info("stopped by %s", stop.signal_name)
    except (EdgeRuntimeError, OSError) as exc:
        log.error("failed: %s: %s", type(exc).__name__, exc)
        return 1
    print(format_counts(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
