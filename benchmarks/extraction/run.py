"""Model extraction against the gateway: simulated attackers under each defence setting.

    python benchmarks/extraction/run.py [--budgets 1000,5000,15000] [--honest-clients 4]
        [--honest-queries 250] [--settings off,rate-limit,...,all]
        [--json FILE] [--markdown FILE] [--plot FILE]

Four attackers, each with its own API key and address, spend a query budget. Three ask for
labels, each from one source: Wikipedia sentences, Banking77 training queries (a neighbouring
domain) and templated in-domain queries filled with CLINC150 training words. The fourth,
``tools``, sends the templated queries with tools, one per CLINC150 intent: each request
carries the 15 tools of one CLINC150 domain, in turn, and the attacker harvests the tool
calls, so it meets the decoy orchestrator.

Honest clients send at the same time, one query every ``--honest-interval`` seconds: the
replay group (``--honest-clients`` clients replaying shuffled CLINC150 test queries), one
client replaying out-of-scope test queries (a device whose users mostly ask what the
classifier cannot answer), and two tool-calling clients that send the tools of one domain
(banking, travel) with test queries, 80% of them from that domain.

All traffic goes through the real gateway application (see simulation.py) on a simulated
clock. Attackers send at ``--attacker-rate`` queries per second and slow down to the rate that
the RateLimit headers allow, and wait Retry-After after a 429. A 403 ends an attacker.

Each attacker trains a clone on the answers it got, one per budget on the first queries of its
harvest: softmax regression on hashed word and character n-grams (``NgramLogisticRegression``
from benchmarks/watermark_detection.py). The tool-calling attacker maps a tool call to the
intent the tool is named after and drops calls to tools it did not send, which are decoys.
report.py writes the tables, the comparison of all defences against none, and the plot.
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
from report import markdown_report, plot_fidelity, summarize  # noqa: E402
from simulation import (  # noqa: E402
    SETTINGS,
    Client,
    PrecomputedTeacher,
    SimulatedClock,
    build_gateway,
    gateway_config,
    run_clients,
)
from sources import SOURCES, domain_tools, load_source  # noqa: E402
from watermark_detection import NgramLogisticRegression  # noqa: E402

from edge_runtime.data import load_split  # noqa: E402
from edge_runtime.gateway.monitor import ReferenceSet, TextFeaturizer  # noqa: E402
from edge_runtime.gateway.randomize import normalize_query  # noqa: E402
from edge_runtime.gateway.watermark import WatermarkError, verify_suspect  # noqa: E402

TOOL_ATTACKER = "tools"
ATTACKERS = (*SOURCES, TOOL_ATTACKER)
TOOL_ATTACKER_SOURCE = "templated"
HONEST_TOOL_DOMAINS = ("banking", "travel")
HONEST_TOOL_IN_DOMAIN = 0.8  # share of a tool-calling client's queries from its own domain


def parse_budgets(text: str) -> list[int]:
    budgets = sorted({int(part) for part in text.split(",") if part.strip()})
    if not budgets or budgets[0] < 1:
        raise argparse.ArgumentTypeError(
            f"invalid budgets {text!r}: expected positive "
            "integers separated by commas, such as 1000,5000"
        )
    return budgets


def parse_settings(text: str) -> list[str]:
    settings = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in settings if name not in SETTINGS]
    if unknown or not settings:
        raise argparse.ArgumentTypeError(
            f"invalid settings {unknown or text!r}: choose from {', '.join(SETTINGS)}"
        )
    return settings


class CloneTrainer:
    """Train and score clones, reusing the scores when the same harvest was seen before.

    A clone takes about 40 MB, so only the clones of the current setting are kept, for the
    watermark check; ``forget_clones`` drops them.
    """

    def __init__(
        self,
        labels: list[str],
        test_texts: list[str],
        test_gold: list[str],
        test_teacher: list[str],
    ):
        self.labels = labels
        self.test_texts = test_texts
        self.test_gold = test_gold
        self.test_teacher = test_teacher
        self.scores: dict[str, tuple[float, float]] = {}
        self.clones: dict[str, NgramLogisticRegression] = {}

    def train(
        self, texts: list[str], answers: list[str], keep_clone: bool
    ) -> tuple[NgramLogisticRegression | None, float, float]:
        """Return the clone (None unless ``keep_clone``), its fidelity to the teacher and its
        accuracy on the test split."""
        digest = hashlib.sha256(json.dumps([texts, answers]).encode()).hexdigest()
        if digest in self.scores and (digest in self.clones or not keep_clone):
            return self.clones.get(digest), *self.scores[digest]
        clone = NgramLogisticRegression(self.labels)
        clone.fit(texts, answers)
        predicted = clone.predict(self.test_texts)
        self.scores[digest] = (
            share_equal(predicted, self.test_teacher),
            share_equal(predicted, self.test_gold),
        )
        if keep_clone:
            self.clones[digest] = clone
        return (clone if keep_clone else None), *self.scores[digest]

    def forget_clones(self) -> None:
        self.clones.clear()


def share_equal(first: list[str], second: list[str]) -> float:
    return sum(a == b for a, b in zip(first, second, strict=True)) / len(first)


async def watermark_p_value(gateway, client: Client, budget: int, clone) -> dict:
    """Verify the clone against the ledger entries of the attacker's first ``budget`` queries."""
    if gateway.ledger is None:
        return {"p_value": None, "note": "watermark off"}
    asked = {normalize_query(text) for text in client.queries[:budget]}
    entries = [
        entry for entry in await gateway.ledger.entries(client.client_id) if entry.text in asked
    ]
    try:
        result = verify_suspect(entries, clone.predict)
    except WatermarkError as exc:
        marked = sum(entry.marked for entry in entries)
        return {"p_value": None, "marked": marked, "note": str(exc)}
    return {"p_value": result.p_value, "marked": result.n, "matches": result.matches}


def harvest(client: Client, answered: int) -> tuple[list[str], list[str]]:
    """Return the (query, label) pairs of the first ``answered`` answers, without decoys."""
    pairs = [
        (text, answer)
        for text, answer, decoy in zip(
            client.queries[:answered],
            client.answers[:answered],
            client.decoys[:answered],
            strict=True,
        )
        if not decoy
    ]
    return [text for text, _ in pairs], [answer for _, answer in pairs]


def make_attackers(args, shared: dict) -> list[Client]:
    """Return one attacker per entry of ``ATTACKERS``, with fresh answer records."""
    tools = shared["tools_by_domain"]
    domains = list(tools)

    def domain_in_turn(position: int) -> list[dict]:
        return tools[domains[position % len(domains)]]

    attackers = []
    for index, name in enumerate(ATTACKERS):
        source = TOOL_ATTACKER_SOURCE if name == TOOL_ATTACKER else name
        attackers.append(
            Client(
                f"attacker-{name}",
                f"10.0.1.{index + 1}",
                shared["attack_queries"][source],
                1.0 / args.attacker_rate,
                args.budgets[-1],
                tools=domain_in_turn if name == TOOL_ATTACKER else None,
            )
        )
    return attackers


def make_honest_groups(args, shared: dict) -> dict[str, list[Client]]:
    """Return the honest clients by group, with fresh answer records."""
    groups = {
        "replay": [
            Client(
                f"honest-{index}",
                f"10.0.2.{index + 1}",
                queries,
                args.honest_interval,
                len(queries),
            )
            for index, queries in enumerate(shared["honest_queries"])
        ]
    }

    oos_queries = shared["oos_queries"]
    if oos_queries:
        groups["out-of-scope"] = [
            Client("honest-oos", "10.0.3.1", oos_queries, args.honest_interval, len(oos_queries))
        ]

    tool_clients = []
    for index, (domain, queries) in enumerate(shared["tool_queries"].items()):
        domain_tools_list = shared["tools_by_domain"][domain]
        tool_clients.append(
            Client(
                f"honest-tools-{domain}",
                f"10.0.4.{index + 1}",
                queries,
                args.honest_interval,
                len(queries),
                tools=lambda position, chosen=domain_tools_list: chosen,
            )
        )
    if tool_clients:
        groups["tools"] = tool_clients
    return groups


async def run_setting(setting: str, args, shared: dict) -> dict:
    """Run every client against the gateway of one setting and score the harvests."""
    clock = SimulatedClock()
    audit_path = Path(shared["workdir"]) / f"audit-{setting}.jsonl"
    gateway = build_gateway(
        setting,
        shared["config"],
        shared["teacher"],
        shared["labels"],
        shared["reference"],
        shared["featurizer"],
        clock,
        shared["secrets"],
        audit_path,
    )
    attackers = make_attackers(args, shared)
    groups = make_honest_groups(args, shared)
    everyone = attackers + [client for clients in groups.values() for client in clients]
    started = time.perf_counter()
    await run_clients(gateway, clock, everyone)
    seconds = time.perf_counter() - started
    requests = sum(len(c.answers) + c.rejected_429 for c in everyone)

    rows = []
    trainer = shared["trainer"]
    for name, attacker in zip(ATTACKERS, attackers, strict=True):
        for budget in args.budgets:
            answered = min(budget, len(attacker.answers))
            calls = sum(attacker.tool_calls[:answered])
            row = {
                "setting": setting,
                "attacker": name,
                "budget": budget,
                "answered": answered,
                "rejected_429": attacker.rejected_429,
                "degraded_after": attacker.degraded_after,
                "block_tier_after": attacker.block_tier_after,
                "blocked_after": attacker.blocked_after,
                "max_risk": attacker.max_risk,
                "tool_calls": calls,
                "decoy_calls": sum(attacker.decoys[:answered]),
                "simulated_seconds": (attacker.answered_at[answered - 1] if answered else None),
            }
            texts, labels = harvest(attacker, answered)
            if texts:
                clone, fidelity, accuracy = trainer.train(
                    texts, labels, keep_clone=gateway.ledger is not None
                )
                row.update(fidelity=fidelity, accuracy=accuracy, trained_on=len(texts))
                row["watermark"] = await watermark_p_value(gateway, attacker, answered, clone)
            rows.append(row)
    trainer.forget_clones()

    honest = [score_honest(group, clients, shared) for group, clients in groups.items()]
    print(
        f"{setting}: {requests} requests in {seconds:.0f} s real, simulated {clock.now:.0f} s",
        flush=True,
    )
    return {
        "setting": setting,
        "attackers": rows,
        "honest": honest,
        "real_seconds": seconds,
        "requests": requests,
    }


def score_honest(group: str, clients: list[Client], shared: dict) -> dict:
    """Score one group of honest clients against the teacher's own top-1 on their queries."""
    correct = teacher_correct = total = 0
    flagged = blocked = rejected = tool_calls = decoy_calls = 0
    risks = [client.max_risk for client in clients if client.max_risk is not None]
    for client in clients:
        golds = [shared["gold_by_text"][text] for text in client.queries]
        tops = [shared["top_by_text"][text] for text in client.queries]
        correct += sum(a == g for a, g in zip(client.answers, golds, strict=False))
        teacher_correct += sum(t == g for t, g in zip(tops, golds, strict=True))
        total += len(client.queries)
        flagged += client.degraded_after is not None
        blocked += client.blocked_after is not None or client.block_tier_after is not None
        rejected += client.rejected_429
        tool_calls += sum(client.tool_calls)
        decoy_calls += sum(client.decoys)
    return {
        "group": group,
        "queries": total,
        "teacher_accuracy": teacher_correct / total,
        "answered_accuracy": correct / total,
        "accuracy_change": (correct - teacher_correct) / total,
        "clients": len(clients),
        "clients_flagged": flagged,
        "clients_blocked": blocked,
        "rejected_429": rejected,
        "tool_calls": tool_calls,
        "decoy_calls": decoy_calls,
        "max_risk": max(risks) if risks else None,
    }


def honest_tool_queries(
    test: list, domains: dict[str, list[dict]], count: int, seed: int
) -> dict[str, list[str]]:
    """Return each honest tool client's test queries: 80% from its domain, the rest from
    other domains and out of scope, shuffled."""
    queries = {}
    for offset, domain in enumerate(HONEST_TOOL_DOMAINS):
        intents = {tool["function"]["name"] for tool in domains[domain]}
        own = [example.text for example in test if example.label in intents]
        other = [example.text for example in test if example.label not in intents]
        rng = random.Random(seed + offset)
        rng.shuffle(own)
        rng.shuffle(other)
        in_domain = round(count * HONEST_TOOL_IN_DOMAIN)
        chosen = own[:in_domain] + other[: count - in_domain]
        rng.shuffle(chosen)
        queries[domain] = chosen
    return queries


def prepare(args) -> dict:
    """Load the data, rank every query with the teacher in one batch, build the reference."""
    data_root = Path(args.data_root)
    clinc = data_root / "clinc150"
    train = load_split(clinc, "train")
    val = load_split(clinc, "val")
    test = load_split(clinc, "test")
    max_budget = args.budgets[-1]
    attack_queries = {
        source: load_source(source, max_budget, args.seed, data_root, train) for source in SOURCES
    }

    honest_pool = list(test)
    random.Random(args.seed).shuffle(honest_pool)
    honest_pool = honest_pool[: args.honest_clients * args.honest_queries]
    honest_queries = [
        [example.text for example in honest_pool[index :: args.honest_clients]]
        for index in range(args.honest_clients)
    ]
    oos_queries = [example.text for example in test if example.label == "oos"]
    random.Random(args.seed + 1).shuffle(oos_queries)
    oos_queries = oos_queries[: args.honest_oos_queries]
    tools_by_domain = domain_tools(clinc)
    tool_queries = (
        honest_tool_queries(test, tools_by_domain, args.honest_tool_queries, args.seed + 2)
        if args.honest_tool_queries
        else {}
    )

    teacher = load_teacher(args.package, args.signer_key)
    labels = list(teacher.labels)
    texts = sorted(
        {text for queries in attack_queries.values() for text in queries}
        | {example.text for example in test}
    )
    started = time.perf_counter()
    ranked = teacher_candidates(teacher.predict_batch(texts), teacher.labels)
    candidates = dict(zip(texts, ranked, strict=True))
    print(
        f"teacher ranked {len(texts)} queries in {time.perf_counter() - started:.0f} s", flush=True
    )
    model = f"{teacher.package.manifest.name}@{teacher.package.manifest.version}"

    featurizer = TextFeaturizer()
    reference = ReferenceSet.build(
        featurizer, [e.text for e in train], [e.label for e in train], [e.text for e in val]
    )
    test_texts = [example.text for example in test]
    test_gold = [example.label for example in test]
    test_teacher = [candidates[text][0][0] for text in test_texts]
    clients = (
        [f"attacker-{name}" for name in ATTACKERS]
        + [f"honest-{index}" for index in range(args.honest_clients)]
        + ["honest-oos"]
        + [f"honest-tools-{domain}" for domain in HONEST_TOOL_DOMAINS]
    )
    degrade = {
        "degrade_rate": args.degrade_rate,
        "degrade_burst": args.degrade_burst,
        "degrade_block_after": args.degrade_block_after,
    }
    return {
        "config": gateway_config(
            clients, args.key_rate, args.key_burst, args.address_rate, args.address_burst, degrade
        ),
        "teacher": PrecomputedTeacher(candidates, model),
        "labels": labels,
        "reference": reference,
        "featurizer": featurizer,
        "secrets": {
            "randomizer": benchmark_key("randomizer"),
            "watermark": benchmark_key("watermark"),
            "decoys": benchmark_key("decoys"),
        },
        "attack_queries": attack_queries,
        "honest_queries": honest_queries,
        "oos_queries": oos_queries,
        "tool_queries": tool_queries,
        "tools_by_domain": tools_by_domain,
        "gold_by_text": {example.text: example.label for example in test},
        "top_by_text": {text: candidates[text][0][0] for text in test_texts},
        "trainer": CloneTrainer(labels, test_texts, test_gold, test_teacher),
    }


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budgets",
        type=parse_budgets,
        default=parse_budgets("1000,5000,15000"),
        help="attacker query budgets, comma-separated, with one clone per "
        "budget (default: 1000,5000,15000). At 15000 the wiki and "
        "Banking77 attackers stop early, because their sources have "
        "about 14,700 and 10,000 queries",
    )
    parser.add_argument(
        "--settings",
        type=parse_settings,
        default=list(SETTINGS),
        help=f"defence settings, comma-separated (default: {','.join(SETTINGS)})",
    )
    parser.add_argument(
        "--honest-clients",
        type=int,
        default=4,
        help="honest clients replaying CLINC150 test queries (default: 4)",
    )
    parser.add_argument(
        "--honest-queries",
        type=int,
        default=250,
        help="test queries each replaying client sends (default: 250)",
    )
    parser.add_argument(
        "--honest-oos-queries",
        type=int,
        default=250,
        help="out-of-scope test queries the out-of-scope client sends; 0 "
        "leaves that client out (default: 250)",
    )
    parser.add_argument(
        "--honest-tool-queries",
        type=int,
        default=250,
        help="test queries each of the two tool-calling clients sends; 0 "
        "leaves them out (default: 250)",
    )
    parser.add_argument(
        "--honest-interval",
        type=float,
        default=2.0,
        help="seconds between an honest client's queries (default: 2.0)",
    )
    parser.add_argument(
        "--attacker-rate",
        type=float,
        default=50.0,
        help="queries per second an attacker sends when no limit slows it (default: 50)",
    )
    parser.add_argument(
        "--key-rate",
        type=float,
        default=10.0,
        help="per-key rate limit in requests per second (default: 10)",
    )
    parser.add_argument("--key-burst", type=int, default=20, help="per-key burst (default: 20)")
    parser.add_argument(
        "--address-rate",
        type=float,
        default=20.0,
        help="per-address rate limit in requests per second (default: 20)",
    )
    parser.add_argument(
        "--address-burst", type=int, default=40, help="per-address burst (default: 40)"
    )
    parser.add_argument(
        "--degrade-rate",
        type=float,
        default=1.0,
        help="rate limit of degraded clients in requests per second "
        "(default: 1.0, the gateway's default)",
    )
    parser.add_argument(
        "--degrade-burst", type=int, default=5, help="burst of degraded clients (default: 5)"
    )
    parser.add_argument(
        "--degrade-block-after",
        type=int,
        default=600,
        help="requests in a row with the degrade limit exhausted before the "
        "setting 'all' blocks a client (default: 600)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the query order")
    parser.add_argument("--package", default=str(ROOT / "models" / "clinc150-teacher.edgepkg"))
    parser.add_argument(
        "--signer-key", default=str(ROOT / "models" / "keys" / "demo-signer.pub.pem")
    )
    parser.add_argument(
        "--data-root",
        default=str(ROOT.parent / "shared" / "data"),
        help="folder with clinc150, banking77 and wiki_sentences",
    )
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the tables as Markdown")
    parser.add_argument(
        "--plot",
        metavar="FILE",
        help="draw fidelity against simulated time to a PNG or SVG file (needs matplotlib)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
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

    summary = summarize(results, args.budgets[-1])
    report = markdown_report(results, summary)
    print(report)
    print(f"{total:.0f} s in all on {platform.machine()}")
    if args.json:
        document = {
            "arguments": dict(vars(args)),
            "machine": platform.machine(),
            "seconds": total,
            "summary": summary,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(document, indent=2), encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(report, encoding="utf-8")
    if args.plot:
        plot_fidelity(results, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
