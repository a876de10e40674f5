"""Hit rate and wrong hits of the semantic answer cache on CLINC150.

The runtime asks the teacher only for queries that the student's gate escalates. With a
semantic cache, an escalated query whose student logits (mean-centred) are close enough in
cosine similarity to those of an earlier escalated query reuses that query's teacher label.
This replays CLINC150 validation and then test queries, in order, as device traffic:

- the student (models/clinc150-student.edgepkg) scores each query, and its gate decides;
- each escalated query is looked up in one ``SemanticCache`` per threshold; on a miss the
  "teacher" (models/clinc150-teacher.edgepkg, run here in-process) labels it and the label is
  stored;
- a hit is **wrong** when the reused label differs from the teacher's own label for that query.

    python benchmarks/semantic_cache.py [--thresholds 0.98,0.99,0.995,0.999] [--json FILE]

It also reports the exact cache (normalised text) for the same traffic.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_runtime import encryption, signing  # noqa: E402
from edge_runtime.cache import AnswerCache, SemanticCache  # noqa: E402
from edge_runtime.data import load_split  # noqa: E402
from edge_runtime.gate import ConfidenceGate  # noqa: E402
from edge_runtime.model import OnnxClassifier  # noqa: E402
from edge_runtime.package import TrustPolicy, read_package  # noqa: E402


def parse_thresholds(text: str) -> list[float]:
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise SystemExit(f"--thresholds must be comma-separated numbers, got {text!r}") from None
    if not values or not all(0.0 < value <= 1.0 for value in values):
        raise SystemExit(f"--thresholds must lie in (0, 1], got {text!r}")
    return values


def demo_trust() -> TrustPolicy:
    keys = ROOT / "models" / "keys"
    signer = signing.load_public_key_pem((keys / "demo-signer.pub.pem").read_bytes())
    device = encryption.load_private_key(keys / "demo-device.key.pem")
    return TrustPolicy(trusted_keys=(signer,), device_key=device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default=str(ROOT / "models/clinc150-student.edgepkg"))
    parser.add_argument("--teacher", default=str(ROOT / "models/clinc150-teacher.edgepkg"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/clinc150"),
                        help="CLINC150 folder (default: %(default)s)")
    parser.add_argument("--thresholds", default="0.98,0.99,0.995,0.999",
                        help="cosine similarity thresholds to compare (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to this file")
    args = parser.parse_args(argv)
    thresholds = parse_thresholds(args.thresholds)

    trust = demo_trust()
    student_package = read_package(args.student, trust)
    student = OnnxClassifier(student_package)
    teacher = OnnxClassifier(read_package(args.teacher, trust))
    gate = ConfidenceGate(student_package.manifest.gate)
    traffic = [example.text for split in ("val", "test")
               for example in load_split(args.data, split)]

    semantic = {threshold: SemanticCache(threshold=threshold) for threshold in thresholds}
    wrong = dict.fromkeys(thresholds, 0)
    exact = AnswerCache()
    exact_wrong = 0
    escalated = 0
    started = time.perf_counter()
    for index, text in enumerate(traffic, 1):
        logits = student.predict(text).logits
        if gate.decide(logits).local:
            continue
        escalated += 1
        teacher_label = teacher.labels[int(teacher.predict(text).logits.argmax())]
        vector = logits - logits.mean()
        for threshold, cache in semantic.items():
            hit = cache.get(vector)
            if hit is None:
                cache.put(vector, teacher_label)
            elif hit[0] != teacher_label:
                wrong[threshold] += 1
        cached = exact.get(text)
        if cached is None:
            exact.put(text, teacher_label)
        elif cached != teacher_label:
            exact_wrong += 1
        if index % 1000 == 0:
            print(f"{index}/{len(traffic)} queries, {escalated} escalated", file=sys.stderr)
    elapsed = time.perf_counter() - started

    rows = [{"cache": "exact (normalised text)", "hits": exact.stats.hits,
             "wrong_hits": exact_wrong}]
    rows += [{"cache": f"semantic, cosine >= {threshold}", "hits": semantic[threshold].stats.hits,
              "wrong_hits": wrong[threshold]} for threshold in thresholds]
    for row in rows:
        row["hit_rate"] = row["hits"] / escalated if escalated else 0.0
        row["wrong_share_of_hits"] = row["wrong_hits"] / row["hits"] if row["hits"] else 0.0
    record = {"queries": len(traffic), "escalated": escalated, "rows": rows,
              "seconds": round(elapsed, 1), "machine": platform.machine(),
              "student": Path(args.student).name, "teacher": Path(args.teacher).name}

    print(f"\n{len(traffic)} CLINC150 validation + test queries, {escalated} escalated by the "
          f"student's gate ({elapsed:.0f} s)\n")
    print("| cache | hits | hit rate (of escalated) | wrong hits | wrong share of hits |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['cache']} | {row['hits']} | {row['hit_rate']:.1%} | {row['wrong_hits']} "
              f"| {row['wrong_share_of_hits']:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
