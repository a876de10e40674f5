"""Honest accuracy cost of keyed output randomization on CLINC150, with the real teacher.

    python benchmarks/randomization_accuracy.py [--package models/clinc150-teacher.edgepkg]
        [--signer-key models/keys/demo-signer.pub.pem] [--data ../shared/data/clinc150]
        [--margin 0.15] [--keys 20] [--json FILE]

Runs the signed teacher package over the validation and test splits with ``predict_batch``,
ranks the labels as the gateway's ONNX backend does (softmax of the raw logits, top 5), and
answers every query through ``KeyedRandomizer.choose`` in the default tier and in the
"degrade" tier. For each split and tier it prints:

- accuracy of the teacher's top-1, and accuracy after randomization with one fixed benchmark
  key, with the minimum and maximum over ``--keys`` further keys;
- the expected accuracy over keys: on a near-tie either label is chosen with probability 1/2,
  so the expectation is exact and needs no sampling;
- the share of near-ties and the share of answers changed.

A sweep of margins shows the expected accuracy change at each. The default margin was chosen on
the validation split and is reported on the test split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_runtime import signing  # noqa: E402
from edge_runtime.data import load_split  # noqa: E402
from edge_runtime.gateway.backends import CANDIDATES  # noqa: E402
from edge_runtime.gateway.randomize import (  # noqa: E402
    DEFAULT_DEGRADED_MARGIN,
    DEFAULT_MARGIN,
    DEGRADE_TIER,
    KeyedRandomizer,
)
from edge_runtime.model import OnnxClassifier  # noqa: E402
from edge_runtime.package import TrustPolicy  # noqa: E402

SWEEP_MARGINS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


def benchmark_key(name: str) -> bytes:
    """Return a fixed 32-byte key, so that reruns give the same figures."""
    return hashlib.sha256(f"edge-runtime benchmark key: {name}".encode()).digest()


def load_teacher(package: str, signer_key: str, threads: int = 2) -> OnnxClassifier:
    trusted = signing.load_public_key_pem(Path(signer_key).read_bytes())
    return OnnxClassifier.from_file(package, threads=threads,
                                    trust=TrustPolicy(trusted_keys=(trusted,)))


def teacher_candidates(logits: np.ndarray, labels: tuple[str, ...]) -> list[tuple]:
    """Rank labels per row as OnnxTeacherBackend does: softmax of raw logits, top CANDIDATES."""
    shifted = logits - logits.max(axis=1, keepdims=True)  # (queries, labels)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    ranked = np.argsort(-probabilities, axis=1, kind="stable")[:, :CANDIDATES]
    return [tuple((labels[int(index)], float(row[index])) for index in order)
            for row, order in zip(probabilities, ranked, strict=True)]


def measure_split(texts: list[str], gold: list[str], candidates: list[tuple], margin: float,
                  degraded_margin: float, tier: str, keys: int) -> dict:
    """Return the accuracy figures of one split answered in ``tier``."""
    count = len(texts)

    def answer_all(secret: bytes) -> list[str]:
        randomizer = KeyedRandomizer(secret, margin=margin, degraded_margin=degraded_margin)
        return [randomizer.choose(text, ranked, tier)
                for text, ranked in zip(texts, candidates, strict=True)]

    tier_margin = KeyedRandomizer(benchmark_key("randomizer"), margin=margin,
                                  degraded_margin=degraded_margin).margin_for(tier)
    top = [ranked[0][0] for ranked in candidates]
    near_tie = [ranked[0][1] - ranked[1][1] <= tier_margin for ranked in candidates]
    answers = answer_all(benchmark_key("randomizer"))
    accuracies = []
    for index in range(keys):
        others = answer_all(benchmark_key(f"randomizer {index}"))
        accuracies.append(sum(a == t for a, t in zip(others, gold, strict=True)) / count)

    top_accuracy = sum(label == truth for label, truth in zip(top, gold, strict=True)) / count
    return {
        "queries": count,
        "tier": tier,
        "margin": tier_margin,
        "accuracy_before": top_accuracy,
        "accuracy_after": sum(a == t for a, t in zip(answers, gold, strict=True)) / count,
        "accuracy_after_expected": top_accuracy + expected_change(gold, candidates,
                                                                  tier_margin) / 100.0,
        "accuracy_after_min": min(accuracies) if accuracies else None,
        "accuracy_after_max": max(accuracies) if accuracies else None,
        "near_tie_share": sum(near_tie) / count,
        "changed_share": sum(a != t for a, t in zip(answers, top, strict=True)) / count,
    }


def expected_change(gold: list[str], candidates: list[tuple], margin: float) -> float:
    """Return the expected accuracy change in points at ``margin``, over keys.

    On a near-tie each of the two labels is chosen with probability 1/2 over keys, so the
    expectation is exact.
    """
    change = 0.0
    for ranked, truth in zip(candidates, gold, strict=True):
        if ranked[0][1] - ranked[1][1] <= margin:
            change += 0.5 * ((ranked[1][0] == truth) - (ranked[0][0] == truth))
    return 100.0 * change / len(gold)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default=str(ROOT / "models" / "clinc150-teacher.edgepkg"))
    parser.add_argument("--signer-key",
                        default=str(ROOT / "models" / "keys" / "demo-signer.pub.pem"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "clinc150"))
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="near-tie margin of the default tier (default: %(default)s)")
    parser.add_argument("--degraded-margin", type=float, default=DEFAULT_DEGRADED_MARGIN,
                        help="near-tie margin of the degrade tier (default: %(default)s)")
    parser.add_argument("--keys", type=int, default=20,
                        help="further keys for the min and max accuracy (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    teacher = load_teacher(args.package, args.signer_key)
    report: dict = {"package": args.package, "machine": f"{platform.machine()}, "
                    f"{platform.processor() or 'unknown CPU'}", "splits": {}, "sweep": {}}
    for split in ("val", "test"):
        examples = load_split(args.data, split)
        texts = [example.text for example in examples]
        gold = [example.label for example in examples]
        candidates = teacher_candidates(teacher.predict_batch(texts), teacher.labels)
        report["splits"][split] = [
            measure_split(texts, gold, candidates, args.margin, args.degraded_margin, tier,
                          args.keys)
            for tier in ("allow", DEGRADE_TIER)
        ]
        report["sweep"][split] = {margin: expected_change(gold, candidates, margin)
                                  for margin in SWEEP_MARGINS}

    print(f"teacher {args.package}, {platform.machine()}, "
          f"{time.perf_counter() - started:.0f} s")
    print("| split | tier | margin | accuracy before | after (benchmark key) | after, "
          f"expected | after, min-max over {args.keys} keys | near-ties | answers changed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for split, rows in report["splits"].items():
        for row in rows:
            spread = (f"{100 * row['accuracy_after_min']:.2f}-"
                      f"{100 * row['accuracy_after_max']:.2f}%" if args.keys else "-")
            print(f"| {split} ({row['queries']}) | {row['tier']} | {row['margin']} | "
                  f"{100 * row['accuracy_before']:.2f}% | {100 * row['accuracy_after']:.2f}% | "
                  f"{100 * row['accuracy_after_expected']:.2f}% | {spread} | "
                  f"{100 * row['near_tie_share']:.2f}% | {100 * row['changed_share']:.2f}% |")
    print("expected accuracy change in points, by margin:")
    for split, sweep in report["sweep"].items():
        cells = ", ".join(f"{margin}: {change:+.3f}" for margin, change in sweep.items())
        print(f"  {split}: {cells}")

    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
