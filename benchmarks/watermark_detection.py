"""Watermark detection on CLINC150: a clone trained on a harvest against independent models.

    python benchmarks/watermark_detection.py [--package models/clinc150-teacher.edgepkg]
        [--student models/clinc150-student.edgepkg] [--signer-key PEM] [--device-key PEM]
        [--data ../shared/data/clinc150] [--compare-alternatives] [--json FILE]

The attacker's harvest is every CLINC150 training query (15,100 with the out-of-scope ones)
answered by the real teacher package as the gateway answers a client: the watermark at its
maximum rate of 0.5% (``Watermark.alternative`` on marked queries), keyed randomization of
near-ties at the default margin elsewhere, and every marked query and control recorded in a
``WatermarkLedger`` on a ``MemoryStateStore``. The suspects are:

- ``clone-ngram``: multinomial logistic regression on hashed word 1-2-grams and character
  3-4-grams (2^16 features), trained with mini-batch SGD on (query, returned label);
- ``clone-student-logits``: logistic regression on the student package's logits, trained on
  (query, returned label);
- ``independent-ngram``: the n-gram model trained on CLINC150's gold labels instead;
- ``student``: the student package as built, distilled from the teacher without the gateway.

Each suspect is verified with ``verify_suspect`` from at most 500 queries. For every suspect,
the script also prints how many marked queries a p-value below 1e-6 needs at its observed
match rate and control bound, and the harvest size that yields them at the 0.5% rate.

``--compare-alternatives`` retrains the n-gram clone with two other choices of alternative,
the teacher's second label only and a keyed label among all others, and prints how many
marked queries each clone reproduces.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import math
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from randomization_accuracy import benchmark_key, load_teacher, teacher_candidates  # noqa: E402

from edge_runtime import encryption, signing  # noqa: E402
from edge_runtime.data import load_split  # noqa: E402
from edge_runtime.gateway.randomize import KeyedRandomizer, normalize_query  # noqa: E402
from edge_runtime.gateway.state import MemoryStateStore  # noqa: E402
from edge_runtime.gateway.watermark import (  # noqa: E402
    DEFAULT_CONTROL_ALPHA,
    MAX_RATE,
    LedgerEntry,
    Watermark,
    WatermarkLedger,
    binomial_tail,
    verify_suspect,
)
from edge_runtime.model import OnnxClassifier  # noqa: E402
from edge_runtime.package import TrustPolicy  # noqa: E402

CLIENT = "attacker"
HASH_FEATURES = 2**16
TARGET_P_VALUE = 1e-6


# ---------------------------------------------------------------------------------------------
# Clone models


def hashed_features(text: str) -> np.ndarray:
    """Return the sorted feature ids of word 1-2-grams and character 3-4-grams of ``text``."""
    lowered = text.lower()
    words = lowered.split()
    grams = {"w:" + word for word in words}
    grams |= {f"b:{first} {second}" for first, second in zip(words, words[1:], strict=False)}
    padded = f" {lowered} "
    for size in (3, 4):
        grams |= {"c:" + padded[start:start + size] for start in range(len(padded) - size + 1)}
    return np.array(sorted({zlib.crc32(gram.encode()) % HASH_FEATURES for gram in grams}),
                    dtype=np.int64)


class NgramLogisticRegression:
    """Softmax regression on hashed n-grams, each row scaled to unit L2 norm."""

    def __init__(self, labels: list[str]):
        self.labels = labels
        self.index = {label: position for position, label in enumerate(labels)}
        self.weights = np.zeros((HASH_FEATURES, len(labels)), dtype=np.float32)
        self.bias = np.zeros(len(labels), dtype=np.float32)

    @staticmethod
    def _batch(rows: list[np.ndarray]):
        lengths = [len(row) for row in rows]
        columns = np.concatenate(rows)
        values = np.concatenate([np.full(n, 1.0 / math.sqrt(n), np.float32) for n in lengths])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        row_of_value = np.repeat(np.arange(len(rows)), lengths)
        return columns, values, starts, row_of_value

    def _logits(self, rows: list[np.ndarray]) -> np.ndarray:
        columns, values, starts, _ = self._batch(rows)
        weighted = self.weights[columns] * values[:, None]  # (values, labels)
        return np.add.reduceat(weighted, starts, axis=0) + self.bias  # (rows, labels)

    def fit(self, texts: list[str], targets: list[str], epochs: int = 10,
            batch_size: int = 256, learning_rate: float = 1.0, seed: int = 0) -> None:
        rows = [hashed_features(text) for text in texts]
        y = np.array([self.index[label] for label in targets])
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            order = rng.permutation(len(rows))
            for first in range(0, len(rows), batch_size):
                chosen = order[first:first + batch_size]
                batch_rows = [rows[i] for i in chosen]
                columns, values, starts, row_of_value = self._batch(batch_rows)
                logits = np.add.reduceat(self.weights[columns] * values[:, None], starts,
                                         axis=0) + self.bias
                logits -= logits.max(axis=1, keepdims=True)
                gradient = np.exp(logits)
                gradient /= gradient.sum(axis=1, keepdims=True)
                gradient[np.arange(len(chosen)), y[chosen]] -= 1.0  # softmax minus one-hot
                np.add.at(self.weights, columns,
                          -learning_rate * gradient[row_of_value] * values[:, None])
                self.bias -= learning_rate * gradient.sum(axis=0) / len(chosen)

    def predict(self, texts: list[str]) -> list[str]:
        predicted = []
        for first in range(0, len(texts), 1024):
            rows = [hashed_features(text) for text in texts[first:first + 1024]]
            predicted += [self.labels[int(i)] for i in self._logits(rows).argmax(axis=1)]
        return predicted


class LogitLogisticRegression:
    """Softmax regression on standardized student logits, trained full-batch with Adam."""

    def __init__(self, student: OnnxClassifier):
        self.student = student
        self.labels = list(student.labels)

    def fit(self, texts: list[str], targets: list[str], steps: int = 500,
            learning_rate: float = 0.1) -> None:
        features = self.student.predict_batch(texts)  # (queries, labels)
        self.mean = features.mean(axis=0)
        self.scale = features.std(axis=0) + 1e-6
        x = (features - self.mean) / self.scale
        index = {label: position for position, label in enumerate(self.labels)}
        y = np.array([index[label] for label in targets])
        self.weights = np.zeros((x.shape[1], len(self.labels)))
        self.bias = np.zeros(len(self.labels))
        first_moment = np.zeros_like(self.weights)
        second_moment = np.zeros_like(self.weights)
        for step in range(1, steps + 1):
            logits = x @ self.weights + self.bias
            logits -= logits.max(axis=1, keepdims=True)
            gradient = np.exp(logits)
            gradient /= gradient.sum(axis=1, keepdims=True)
            gradient[np.arange(len(y)), y] -= 1.0
            gradient /= len(y)
            weight_gradient = x.T @ gradient
            first_moment = 0.9 * first_moment + 0.1 * weight_gradient
            second_moment = 0.999 * second_moment + 0.001 * weight_gradient**2
            corrected_first = first_moment / (1 - 0.9**step)
            corrected_second = second_moment / (1 - 0.999**step)
            self.weights -= learning_rate * corrected_first / (np.sqrt(corrected_second) + 1e-8)
            self.bias -= learning_rate * gradient.sum(axis=0)

    def predict(self, texts: list[str]) -> list[str]:
        x = (self.student.predict_batch(list(texts)) - self.mean) / self.scale
        return [self.labels[int(i)] for i in (x @ self.weights + self.bias).argmax(axis=1)]


# ---------------------------------------------------------------------------------------------
# Harvest


async def harvest(texts: list[str], candidates: list[tuple], labels: list[str],
                  watermark: Watermark, randomizer: KeyedRandomizer):
    """Answer every query as the gateway does; return the answers and the client's ledger."""
    ledger = WatermarkLedger(MemoryStateStore(), max_marked=100_000, max_controls=100_000)
    answers = []
    for text, ranked in zip(texts, candidates, strict=True):
        normalized = normalize_query(text)
        alternative = watermark.alternative(normalized, ranked, labels)
        marked = watermark.is_marked(normalized)
        label = alternative if marked else randomizer.choose(text, ranked, "allow")
        if marked or watermark.is_control(normalized):
            await ledger.record(CLIENT, normalized, label, ranked[0][0], marked,
                                alternative=alternative)
        answers.append(label)
    return answers, await ledger.entries(CLIENT)


def variant_entries(entries: list[LedgerEntry], candidates_by_text: dict[str, tuple],
                    labels: list[str], kind: str, secret: bytes) -> list[LedgerEntry]:
    """Return the ledger with another choice of alternative: "second" or "all-labels"."""
    rewritten = []
    for entry in entries:
        ranked = candidates_by_text[entry.text]
        if kind == "second":
            alternative = ranked[1][0]
        else:
            others = sorted(label for label in labels if label != ranked[0][0])
            digest = hmac.new(secret, entry.text.encode(), hashlib.sha256).digest()
            alternative = others[int.from_bytes(digest[:8], "big") % len(others)]
        given_label = alternative if entry.marked else entry.given_label
        rewritten.append(LedgerEntry(entry.client, entry.text, given_label, entry.top_label,
                                     alternative, entry.marked, entry.recorded_at))
    return rewritten


def marked_needed(match_rate: float, control_upper: float) -> int | None:
    """Return the fewest marked queries whose p-value falls below TARGET_P_VALUE, or None."""
    if match_rate <= control_upper:
        return None
    for n in range(1, 100_000):
        matches = math.floor(match_rate * n)
        if binomial_tail(matches, n, control_upper) + DEFAULT_CONTROL_ALPHA < TARGET_P_VALUE:
            return n
    return None


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default=str(ROOT / "models" / "clinc150-teacher.edgepkg"))
    parser.add_argument("--student", default=str(ROOT / "models" / "clinc150-student.edgepkg"))
    parser.add_argument("--signer-key",
                        default=str(ROOT / "models" / "keys" / "demo-signer.pub.pem"))
    parser.add_argument("--device-key",
                        default=str(ROOT / "models" / "keys" / "demo-device.key.pem"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "clinc150"))
    parser.add_argument("--compare-alternatives", action="store_true",
                        help="also train clones on two other choices of alternative")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    teacher = load_teacher(args.package, args.signer_key)
    student = OnnxClassifier.from_file(args.student, threads=2, trust=TrustPolicy(
        trusted_keys=(signing.load_public_key_pem(Path(args.signer_key).read_bytes()),),
        device_key=encryption.load_private_key(args.device_key)))
    labels = list(teacher.labels)
    examples = load_split(args.data, "train")
    texts = [example.text for example in examples]
    gold = [example.label for example in examples]
    candidates = teacher_candidates(teacher.predict_batch(texts), teacher.labels)
    print(f"teacher answered {len(texts)} training queries "
          f"({time.perf_counter() - started:.0f} s)", flush=True)

    watermark = Watermark(benchmark_key("watermark"), rate=MAX_RATE)
    randomizer = KeyedRandomizer(benchmark_key("randomizer"))
    answers, entries = asyncio.run(harvest(texts, candidates, labels, watermark, randomizer))
    marked_count = sum(entry.marked for entry in entries)
    print(f"harvest: {len(answers)} answers, {marked_count} marked, "
          f"{len(entries) - marked_count} controls in the ledger", flush=True)

    suspects = {}
    clone = NgramLogisticRegression(labels)
    clone.fit(texts, answers)
    suspects["clone-ngram"] = clone.predict
    logit_clone = LogitLogisticRegression(student)
    logit_clone.fit(texts, answers)
    suspects["clone-student-logits"] = logit_clone.predict
    independent = NgramLogisticRegression(labels)
    independent.fit(texts, gold)
    suspects["independent-ngram"] = independent.predict
    suspects["student"] = lambda queries: [
        student.labels[int(i)] for i in student.predict_batch(list(queries)).argmax(axis=1)]
    print(f"suspects trained ({time.perf_counter() - started:.0f} s)", flush=True)

    report = {"queries": len(texts), "marked": marked_count,
              "controls": len(entries) - marked_count, "suspects": {}, "alternatives": {}}
    for name, suspect in suspects.items():
        report["suspects"][name] = verify_suspect(entries, suspect).to_dict()

    if args.compare_alternatives:
        by_text = {normalize_query(text): ranked
                   for text, ranked in zip(texts, candidates, strict=True)}
        for kind in ("second", "all-labels"):
            rewritten = variant_entries(entries, by_text, labels, kind,
                                        benchmark_key("alternative"))
            marked_labels = {entry.text: entry.given_label for entry in rewritten if entry.marked}
            variant_answers = [marked_labels.get(normalize_query(text), answer)
                               for text, answer in zip(texts, answers, strict=True)]
            variant_clone = NgramLogisticRegression(labels)
            variant_clone.fit(texts, variant_answers)
            report["alternatives"][kind] = verify_suspect(rewritten,
                                                          variant_clone.predict).to_dict()
        report["alternatives"]["runners-up (as built)"] = report["suspects"]["clone-ngram"]

    print(f"{len(texts)} queries harvested, {marked_count} marked at rate {MAX_RATE}; "
          f"{time.perf_counter() - started:.0f} s in all")
    print("| suspect | marked n | matches | match rate | controls n | control matches | "
          "control upper bound | binomial tail | p-value | marked needed for p < 1e-6 | "
          "harvest needed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, result in report["suspects"].items():
        needed = marked_needed(result["match_rate"], result["control_upper"])
        result["marked_needed"] = needed
        needed_text = "-" if needed is None else str(needed)
        harvest_text = "-" if needed is None else f"{math.ceil(needed / MAX_RATE):,}"
        print(f"| {name} | {result['n']} | {result['matches']} | {result['match_rate']:.1%} | "
              f"{result['control_n']} | {result['control_matches']} | "
              f"{result['control_upper']:.2%} | {result['binomial_tail']:.2e} | "
              f"{result['p_value']:.2e} | {needed_text} | "
              f"{harvest_text} |")
    if report["alternatives"]:
        print("n-gram clone by choice of alternative:")
        for kind, result in report["alternatives"].items():
            print(f"  {kind}: {result['matches']}/{result['n']} marked reproduced "
                  f"({result['match_rate']:.1%}), controls {result['control_matches']}/"
                  f"{result['control_n']}, p-value {result['p_value']:.2e}")

    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
