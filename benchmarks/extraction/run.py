"""Model extraction against the gateway: simulated attackers under each defence setting.

    python benchmarks/extraction/run.py [--budgets 1000,5000] [--honest-clients 4]
        [--honest-queries 250] [--settings off,rate-limit,monitor,randomize,watermark,all]
        [--json FILE] [--markdown FILE]

Three attackers, each with its own API key and address, spend a query budget on one source:
Wikipedia sentences, Banking77 training queries (a neighbouring domain) and templated
in-domain queries filled with CLINC150 training words. At the same time, ``--honest-clients``
clients replay shuffled CLINC150 test queries at one query per ``--honest-interval`` seconds.
All traffic goes through the real gateway application (see simulation.py) on a simulated
clock. Attackers send at ``--attacker-rate`` queries per second and slow down to the rate that
the RateLimit headers allow, and wait Retry-After after a 429. A 403 ends an attacker.

Each attacker trains a clone on the labels it got, one per budget on the first queries of its
harvest: softmax regression on hashed word and character n-grams (``NgramLogisticRegression``
from benchmarks/watermark_detection.py). The table reports for each setting and attacker:

- clone fidelity (agreement with the teacher's top-1) and accuracy on the CLINC150 test split;
- the simulated seconds until the budget's last query was answered;
- the answered queries after which the monitor degraded and blocked the client, and the
  highest risk it computed for the client over the whole run (not only this budget);
- the watermark p-value of ``verify_suspect`` on the clone, from the attacker's ledger
  entries for the queries of that budget;
- per setting, the honest clients' accuracy against the teacher's own top-1 on the same
  queries (unanswered queries count as wrong) and how many honest clients were flagged.

Not covered in this version: clones on sentence embeddings such as MiniLM, and the decoy
defence, which needs requests with tools while these attackers harvest labels only.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from randomization_accuracy import benchmark_key, load_teacher, teacher_candidates  # noqa: E402
from simulation import (  # noqa: E402
    SETTINGS,
    Client,
    PrecomputedTeacher,
    SimulatedClock,
    build_gateway,
    gateway_config,
    run_clients,
)
from sources import SOURCES, load_source  # noqa: E402
from watermark_detection import NgramLogisticRegression  # noqa: E402

from edge_runtime.data import load_split  # noqa: E402
from edge_runtime.gateway.monitor import ReferenceSet, TextFeaturizer  # noqa: E402
from edge_runtime.gateway.randomize import normalize_query  # noqa: E402
from edge_runtime.gateway.watermark import WatermarkError, verify_suspect  # noqa: E402


def parse_budgets(text: str) -> list[int]:
    budgets = sorted({int(part) for part in text.split(",") if part.strip()})
    if not budgets or budgets[0] < 1:
        raise argparse.ArgumentTypeError(f"invalid budgets {text!r}: expected positive "
                                         "integers separated by commas, such as 1000,5000")
    return budgets


def parse_settings(text: str) -> list[str]:
    settings = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in settings if name not in SETTINGS]
    if unknown or not settings:
        raise argparse.ArgumentTypeError(f"invalid settings {unknown or text!r}: choose from "
                                         f"{', '.join(SETTINGS)}")
    return settings


class CloneTrainer:
    """Train and score clones, reusing a clone when the same harvest was seen before."""

    def __init__(self, labels: list[str], test_texts: list[str], test_gold: list[str],
                 test_teacher: list[str]):
        self.labels = labels
        self.test_texts = test_texts
        self.test_gold = test_gold
        self.test_teacher = test_teacher
        self.cache: dict[str, tuple[NgramLogisticRegression, float, float]] = {}

    def train(self, texts: list[str], answers: list[str]):
        """Return the clone, its fidelity to the teacher and its accuracy on the test split."""
        digest = hashlib.sha256(json.dumps([texts, answers]).encode()).hexdigest()
        if digest not in self.cache:
            clone = NgramLogisticRegression(self.labels)
            clone.fit(texts, answers)
            predicted = clone.predict(self.test_texts)
            fidelity = share_equal(predicted, self.test_teacher)
            accuracy = share_equal(predicted, self.test_gold)
            self.cache[digest] = (clone, fidelity, accuracy)
        return self.cache[digest]


def share_equal(first: list[str], second: list[str]) -> float:
    return sum(a == b for a, b in zip(first, second, strict=True)) / len(first)


async def watermark_p_value(gateway, client: Client, budget: int, clone) -> dict:
    """Verify the clone against the ledger entries of the attacker's first ``budget`` queries."""
    if gateway.ledger is None:
        return {"p_value": None, "note": "watermark off"}
    asked = {normalize_query(text) for text in client.queries[:budget]}
    entries = [entry for entry in await gateway.ledger.entries(client.client_id)
               if entry.text in asked]
    try:
        result = verify_suspect(entries, clone.predict)
    except WatermarkError as exc:
        marked = sum(entry.marked for entry in entries)
        return {"p_value": None, "marked": marked, "note": str(exc)}
    return {"p_value": result.p_value, "marked": result.n, "matches": result.matches}


async def run_setting(setting: str, args, shared: dict) -> dict:
    """Run every client against the gateway of one setting and score the harvests."""
    clock = SimulatedClock()
    audit_path = Path(shared["workdir"]) / f"audit-{setting}.jsonl"
    gateway = build_gateway(setting, shared["config"], shared["teacher"], shared["labels"],
                            shared["reference"], shared["featurizer"], clock,
                            shared["secrets"], audit_path)
    max_budget = args.budgets[-1]
    attackers = [Client(f"attacker-{source}", f"10.0.1.{index + 1}",
                        shared["attack_queries"][source], 1.0 / args.attacker_rate, max_budget)
                 for index, source in enumerate(SOURCES)]
    honest = [Client(f"honest-{index}", f"10.0.2.{index + 1}", queries, args.honest_interval,
                     len(queries))
              for index, queries in enumerate(shared["honest_queries"])]
    started = time.perf_counter()
    await run_clients(gateway, clock, attackers + honest)
    seconds = time.perf_counter() - started
    requests = sum(len(c.answers) + c.rejected_429 for c in attackers + honest)

    rows = []
    for source, attacker in zip(SOURCES, attackers, strict=True):
        for budget in args.budgets:
            answered = min(budget, len(attacker.answers))
            row = {"setting": setting, "attacker": source, "budget": budget,
                   "answered": answered, "rejected_429": attacker.rejected_429,
                   "degraded_after": attacker.degraded_after,
                   "block_tier_after": attacker.block_tier_after,
                   "blocked_after": attacker.blocked_after,
                   "max_risk": attacker.max_risk,
                   "simulated_seconds": (attacker.answered_at[answered - 1]
                                         if answered else None)}
            if answered:
                clone, fidelity, accuracy = shared["trainer"].train(
                    attacker.queries[:answered], attacker.answers[:answered])
                row.update(fidelity=fidelity, accuracy=accuracy)
                row["watermark"] = await watermark_p_value(gateway, attacker, answered, clone)
            rows.append(row)

    honest_summary = score_honest(honest, shared)
    print(f"{setting}: {requests} requests in {seconds:.0f} s real, simulated "
          f"{clock.now:.0f} s", flush=True)
    return {"setting": setting, "attackers": rows, "honest": honest_summary,
            "real_seconds": seconds, "requests": requests}


def score_honest(honest: list[Client], shared: dict) -> dict:
    correct = teacher_correct = total = 0
    flagged = blocked = 0
    risks = [client.max_risk for client in honest if client.max_risk is not None]
    for client in honest:
        golds = [shared["gold_by_text"][text] for text in client.queries]
        tops = [shared["top_by_text"][text] for text in client.queries]
        correct += sum(a == g for a, g in zip(client.answers, golds, strict=False))
        teacher_correct += sum(t == g for t, g in zip(tops, golds, strict=True))
        total += len(client.queries)
        flagged += client.degraded_after is not None
        blocked += client.blocked_after is not None
    return {"queries": total, "teacher_accuracy": teacher_correct / total,
            "answered_accuracy": correct / total,
            "accuracy_change": (correct - teacher_correct) / total,
            "clients": len(honest), "clients_flagged": flagged, "clients_blocked": blocked,
            "max_risk": max(risks) if risks else None}


def format_cell(value, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def markdown_tables(results: list[dict]) -> str:
    lines = ["| setting | attacker | budget | answered | fidelity | accuracy | simulated s | "
             "429s | degraded after | blocked after | max risk | watermark p (marked) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        for row in result["attackers"]:
            watermark = row.get("watermark") or {}
            p_value = watermark.get("p_value")
            p_text = "off" if watermark.get("note") == "watermark off" else (
                f"{format_cell(p_value, '.2e')} ({watermark.get('marked', 0)})")
            blocked = row["blocked_after"] if row["blocked_after"] is not None else (
                row["block_tier_after"])
            lines.append(
                f"| {row['setting']} | {row['attacker']} | {row['budget']} | "
                f"{row['answered']} | {format_cell(row.get('fidelity'), '.1%')} | "
                f"{format_cell(row.get('accuracy'), '.1%')} | "
                f"{format_cell(row['simulated_seconds'], '.0f')} | {row['rejected_429']} | "
                f"{format_cell(row['degraded_after'], 'd')} | {format_cell(blocked, 'd')} | "
                f"{format_cell(row['max_risk'], '.2f')} | {p_text} |")
    lines += ["", "| setting | honest queries | teacher top-1 accuracy | answered accuracy | "
              "change (points) | honest clients flagged | blocked | max risk |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        honest = result["honest"]
        lines.append(
            f"| {result['setting']} | {honest['queries']} | {honest['teacher_accuracy']:.2%} | "
            f"{honest['answered_accuracy']:.2%} | {100 * honest['accuracy_change']:+.2f} | "
            f"{honest['clients_flagged']}/{honest['clients']} | "
            f"{honest['clients_blocked']}/{honest['clients']} | "
            f"{format_cell(honest['max_risk'], '.2f')} |")
    return "\n".join(lines) + "\n"


def prepare(args) -> dict:
    """Load the data, rank every query with the teacher in one batch, build the reference."""
    data_root = Path(args.data_root)
    clinc = data_root / "clinc150"
    train = load_split(clinc, "train")
    val = load_split(clinc, "val")
    test = load_split(clinc, "test")
    max_budget = args.budgets[-1]
    attack_queries = {source: load_source(source, max_budget, args.seed, data_root, train)
                      for source in SOURCES}

    honest_pool = list(test)
    random.Random(args.seed).shuffle(honest_pool)
    honest_pool = honest_pool[:args.honest_clients * args.honest_queries]
    honest_queries = [[example.text for example in honest_pool[index::args.honest_clients]]
                      for index in range(args.honest_clients)]

    teacher = load_teacher(args.package, args.signer_key)
    labels = list(teacher.labels)
    texts = sorted({text for queries in attack_queries.values() for text in queries}
                   | {example.text for example in test})
    started = time.perf_counter()
    ranked = teacher_candidates(teacher.predict_batch(texts), teacher.labels)
    candidates = dict(zip(texts, ranked, strict=True))
    print(f"teacher ranked {len(texts)} queries in {time.perf_counter() - started:.0f} s",
          flush=True)
    model = f"{teacher.package.manifest.name}@{teacher.package.manifest.version}"

    featurizer = TextFeaturizer()
    reference = ReferenceSet.build(featurizer, [e.text for e in train], [e.label for e in train],
                                   [e.text for e in val])
    test_texts = [example.text for example in test]
    test_gold = [example.label for example in test]
    test_teacher = [candidates[text][0][0] for text in test_texts]
    clients = [f"attacker-{source}" for source in SOURCES] + [
        f"honest-{index}" for index in range(args.honest_clients)]
    return {
        "config": gateway_config(clients, args.key_rate, args.key_burst, args.address_rate,
                                 args.address_burst),
        "teacher": PrecomputedTeacher(candidates, model),
        "labels": labels,
        "reference": reference,
        "featurizer": featurizer,
        "secrets": {"randomizer": benchmark_key("randomizer"),
                    "watermark": benchmark_key("watermark")},
        "attack_queries": attack_queries,
        "honest_queries": honest_queries,
        "gold_by_text": {example.text: example.label for example in test},
        "top_by_text": {text: candidates[text][0][0] for text in test_texts},
        "trainer": CloneTrainer(labels, test_texts, test_gold, test_teacher),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=parse_budgets, default=parse_budgets("1000,5000"),
                        help="attacker query budgets, comma-separated, with one clone per "
                             "budget (default: 1000,5000). At 15000 the wiki and Banking77 "
                             "attackers stop early, because their sources have about 14,700 "
                             "and 10,000 queries")
    parser.add_argument("--settings", type=parse_settings, default=list(SETTINGS),
                        help=f"defence settings, comma-separated (default: {','.join(SETTINGS)})")
    parser.add_argument("--honest-clients", type=int, default=4,
                        help="honest clients replaying CLINC150 test queries (default: 4)")
    parser.add_argument("--honest-queries", type=int, default=250,
                        help="test queries each honest client sends (default: 250)")
    parser.add_argument("--honest-interval", type=float, default=2.0,
                        help="seconds between an honest client's queries (default: 2.0)")
    parser.add_argument("--attacker-rate", type=float, default=50.0,
                        help="queries per second an attacker sends when no limit slows it "
                             "(default: 50)")
    parser.add_argument("--key-rate", type=float, default=10.0,
                        help="per-key rate limit in requests per second (default: 10)")
    parser.add_argument("--key-burst", type=int, default=20,
                        help="per-key burst (default: 20)")
    parser.add_argument("--address-rate", type=float, default=20.0,
                        help="per-address rate limit in requests per second (default: 20)")
    parser.add_argument("--address-burst", type=int, default=40,
                        help="per-address burst (default: 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query order")
    parser.add_argument("--package", default=str(ROOT / "models" / "clinc150-teacher.edgepkg"))
    parser.add_argument("--signer-key",
                        default=str(ROOT / "models" / "keys" / "demo-signer.pub.pem"))
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"),
                        help="folder with clinc150, banking77 and wiki_sentences")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the tables as Markdown")
    args = parser.parse_args(argv)
    # The gateway logs every request and tier change at INFO and WARNING, so show errors only.
    logging.basicConfig(level=logging.ERROR)

    started = time.perf_counter()
    shared = prepare(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="extraction-audit-") as workdir:
        shared["workdir"] = workdir
        for setting in args.settings:
            results.append(asyncio.run(run_setting(setting, args, shared)))
    total = time.perf_counter() - started

    tables = markdown_tables(results)
    print(tables)
    print(f"{total:.0f} s in all on {platform.machine()}")
    if args.json:
        report = {"arguments": {key: value for key, value in vars(args).items()},
                  "machine": platform.machine(), "seconds": total, "results": results}
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(tables, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
