"""``edge-runtime watermark`` commands: test a suspect model for the gateway's watermark, and
export a client's ledger from the gateway's Redis state store.

A suspect is a model package, a plain ONNX classifier with its tokenizer.json and a JSON list
of labels, or a service that speaks the gateway protocol (``POST /v1/predict`` with
``{"text"}``, returning ``{"label"}``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from edge_runtime.errors import ConfigError
from edge_runtime.package_cli import add_trust_options, trust_from_args

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 128  # tokens per query for a plain ONNX suspect
RATE_LIMIT_RETRIES = 5  # retries of one query after HTTP 429 from a suspect service
FIRST_RETRY_DELAY = 1.0  # seconds; doubles after each retry


def add_commands(commands: argparse._SubParsersAction) -> None:
    # edge_runtime.cli imports this module, so its helper is imported once the parser is built.
    from edge_runtime.cli import positive_int
    from edge_runtime.gateway.watermark import DEFAULT_CONTROL_ALPHA, DEFAULT_MAX_QUERIES

    watermark = commands.add_parser("watermark",
                                    help="test a suspect model for the gateway's watermark")
    watermark_commands = watermark.add_subparsers(dest="watermark_command", required=True)

    verify = watermark_commands.add_parser(
        "verify", help="send a client's marked and control queries to a suspect model",
        description="Send a client's marked queries, and control queries that were not "
                    "marked, to a suspect model. Prints how often it gives the watermark's "
                    "alternative answer, and the p-value that an unrelated model matches "
                    "that often.")
    verify.add_argument("--ledger", required=True, metavar="FILE",
                        help="ledger in JSON Lines, as written by 'watermark export'")
    verify.add_argument("--client", required=True, metavar="ID",
                        help="client id whose gateway responses the suspect may have been "
                             "trained on")
    suspect = verify.add_mutually_exclusive_group(required=True)
    suspect.add_argument("--model", metavar="PATH",
                         help="suspect model: an .edgepkg package, or an .onnx file with "
                              "--tokenizer and --labels")
    suspect.add_argument("--url", help="suspect service base URL, such as "
                                       "http://127.0.0.1:8080")
    verify.add_argument("--tokenizer", metavar="FILE",
                        help="tokenizer.json of an .onnx suspect")
    verify.add_argument("--labels", metavar="FILE",
                        help="JSON list of an .onnx suspect's labels, in logit order")
    verify.add_argument("--max-length", type=positive_int, default=DEFAULT_MAX_LENGTH,
                        help="tokens per query for an .onnx suspect (default: %(default)s)")
    verify.add_argument("--api-key-env", metavar="VAR",
                        help="environment variable holding the API key of a --url suspect")
    verify.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for each response of a --url suspect "
                             "(default: %(default)s)")
    verify.add_argument("--max-queries", type=positive_int, default=DEFAULT_MAX_QUERIES,
                        help="queries sent to the suspect, controls included "
                             "(default: %(default)s)")
    verify.add_argument("--control-alpha", type=float, default=DEFAULT_CONTROL_ALPHA,
                        help="error probability of the control rate's upper bound, added to "
                             "the p-value (default: %(default)s)")
    verify.add_argument("--seed", type=int, default=0,
                        help="seed of the query sample (default: %(default)s)")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    add_trust_options(verify)

    export = watermark_commands.add_parser(
        "export", help="write a client's ledger from the gateway's Redis state store")
    export.add_argument("--redis-url", required=True,
                        help="Redis URL of the gateway's state store, such as "
                             "redis://127.0.0.1:6379/0")
    export.add_argument("--prefix", default=None,
                        help="key prefix of the state store (default: the gateway's)")
    export.add_argument("--client", required=True, metavar="ID", help="client id to export")
    export.add_argument("--ledger", required=True, metavar="FILE",
                        help="JSON Lines file to write")


def run(args: argparse.Namespace) -> int:
    if args.watermark_command == "verify":
        return _run_verify(args)
    if args.watermark_command == "export":
        return _run_export(args)
    raise ConfigError(f"unknown watermark command {args.watermark_command!r}")


def _run_verify(args: argparse.Namespace) -> int:
    from edge_runtime.gateway.watermark import WatermarkLedger, client_hash, verify_suspect

    if not 0.0 < args.control_alpha < 1.0:
        raise ConfigError(f"--control-alpha must be in (0, 1), got {args.control_alpha}")
    if args.max_queries < 2:
        raise ConfigError("--max-queries must be at least 2: one marked query and one control")
    client = client_hash(args.client)
    entries = [entry for entry in WatermarkLedger.load(args.ledger) if entry.client == client]
    if not entries:
        raise ConfigError(f"the ledger {args.ledger} has no entries for client {args.client!r}")

    suspect, description = _load_suspect(args)
    result = verify_suspect(entries, suspect, max_queries=args.max_queries,
                            control_alpha=args.control_alpha, seed=args.seed)

    if args.json:
        body = {"client": args.client, "ledger": str(args.ledger), "suspect": description,
                **result.to_dict()}
        print(json.dumps(body, indent=2))
        return 0
    print(f"suspect {description}, client {args.client}")
    print(f"marked   n = {result.n}, matches = {result.matches}, "
          f"match rate = {result.match_rate:.1%}")
    print(f"controls n = {result.control_n}, matches = {result.control_matches}, "
          f"control rate = {result.control_rate:.1%} (upper bound {result.control_upper:.1%} "
          f"at confidence 1 - {result.control_alpha:.0e})")
    print(f"p-value  {result.p_value:.2e} (binomial tail {result.binomial_tail:.2e} plus "
          f"{result.control_alpha:.0e} for the control bound)")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from edge_runtime.gateway.state import DEFAULT_PREFIX, RedisStateStore
    from edge_runtime.gateway.watermark import WatermarkLedger

    async def export() -> int:
        store = RedisStateStore(args.redis_url, prefix=args.prefix or DEFAULT_PREFIX)
        try:
            return await WatermarkLedger(store).export(args.client, args.ledger)
        finally:
            await store.close()

    count = asyncio.run(export())
    print(f"wrote {count} entries for client {args.client} to {args.ledger}")
    return 0


# ---------------------------------------------------------------------------------------------
# Suspects


def _load_suspect(args: argparse.Namespace):
    """Return the suspect as a function from queries to labels, and a description of it."""
    if args.url:
        return _ServiceSuspect(args.url, _api_key(args.api_key_env), args.timeout), args.url
    path = Path(args.model)
    if path.suffix == ".onnx":
        if not args.tokenizer or not args.labels:
            raise ConfigError(f"{path} is a plain ONNX model: pass --tokenizer tokenizer.json "
                              "and --labels labels.json with it")
        return _OnnxSuspect(path, Path(args.tokenizer), Path(args.labels),
                            args.max_length), str(path)
    if args.tokenizer or args.labels:
        raise ConfigError("--tokenizer and --labels apply to an .onnx model only; a package "
                          "carries its own")

    from edge_runtime.model import OnnxClassifier

    # Verification inspects a suspect package, it does not install it, so no version is
    # recorded in the rollback state.
    trust = trust_from_args(args).replace(rollback=None)
    classifier = OnnxClassifier.from_file(str(path), trust=trust)

    def predict(texts: Sequence[str]) -> list[str]:
        logits = classifier.predict_batch(list(texts))  # (len(texts), num_labels)
        return [classifier.labels[int(index)] for index in logits.argmax(axis=1)]

    return predict, str(path)


def _api_key(variable: str | None) -> str | None:
    if variable is None:
        return None
    key = os.environ.get(variable)
    if not key:
        raise ConfigError(f"environment variable {variable} is not set; it must hold the "
                          "suspect service's API key")
    return key


class _ServiceSuspect:
    """A suspect behind ``POST /v1/predict``, asked one query at a time."""

    def __init__(self, url: str, api_key: str | None, timeout: float):
        from edge_runtime.teacher_client import TeacherClient

        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--url must start with http:// or https://, got {url!r}")
        if not 0 < timeout <= 3600:
            raise ConfigError(f"--timeout must be above 0 and at most 3600 seconds, got "
                              f"{timeout}")
        self.client = TeacherClient(url, api_key=api_key, read_timeout=timeout)

    def __call__(self, texts: Sequence[str]) -> list[str]:
        try:
            return [self._predict(text) for text in texts]
        finally:
            self.client.close()

    def _predict(self, text: str) -> str:
        from edge_runtime.errors import TeacherRetryLater

        delay = FIRST_RETRY_DELAY
        for attempt in range(RATE_LIMIT_RETRIES + 1):
            try:
                return self.client.predict(text).label
            except TeacherRetryLater as exc:
                # The client already waited what fit in its budget; a longer Retry-After
                # comes back here, and verification may wait longer than one query would.
                if attempt == RATE_LIMIT_RETRIES:
                    raise
                wait = max(delay, exc.retry_after or 0.0)
                log.warning("suspect service asked to retry later (HTTP 429 or 503); "
                            "retrying in %.0f s", wait)
                time.sleep(wait)
                delay *= 2
        raise AssertionError("unreachable: the last attempt returns or raises")


class _OnnxSuspect:
    """A plain ONNX text classifier: BERT-style inputs in, logits (batch, labels) out."""

    def __init__(self, model_path: Path, tokenizer_path: Path, labels_path: Path,
                 max_length: int):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.labels = _read_labels(labels_path)
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
            raise ConfigError(f"cannot load tokenizer {tokenizer_path}: {exc}") from None
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_length)
        try:
            self.session = ort.InferenceSession(str(model_path),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ConfigError(f"ONNX Runtime cannot load {model_path}: {exc}") from None

        self.input_names = [node.name for node in self.session.get_inputs()]
        unknown = set(self.input_names) - {"input_ids", "attention_mask", "token_type_ids"}
        if unknown:
            raise ConfigError(f"{model_path} has the inputs {sorted(unknown)}; a suspect model "
                              "may take input_ids, attention_mask and token_type_ids only")
        outputs = self.session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.labels):
            raise ConfigError(f"{model_path} returns {outputs} logits but {labels_path} lists "
                              f"{len(self.labels)} labels")

    def __call__(self, texts: Sequence[str], batch_size: int = 64) -> list[str]:
        import numpy as np

        predicted = []
        for first in range(0, len(texts), batch_size):
            encodings = self.tokenizer.encode_batch(list(texts[first:first + batch_size]))
            longest = max(len(encoding.ids) for encoding in encodings)
            input_ids = np.zeros((len(encodings), longest), dtype=np.int64)  # (batch, seq)
            attention_mask = np.zeros((len(encodings), longest), dtype=np.int64)
            for row, encoding in enumerate(encodings):
                input_ids[row, :len(encoding.ids)] = encoding.ids
                attention_mask[row, :len(encoding.ids)] = encoding.attention_mask
            feeds = {"input_ids": input_ids, "attention_mask": attention_mask,
                     "token_type_ids": np.zeros_like(input_ids)}
            logits = self.session.run(None, {name: feeds[name] for name in self.input_names})[0]
            predicted += [self.labels[int(index)] for index in logits.argmax(axis=1)]
        return predicted


def _read_labels(path: Path) -> list[str]:
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc.msg}") from None
    if (not isinstance(labels, list) or not labels
            or not all(isinstance(label, str) and label for label in labels)):
        raise ConfigError(f"{path} must hold a JSON list of label strings, in logit order")
    return labels


