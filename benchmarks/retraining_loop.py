"""The retraining loop on CLINC150: a student's escalations, labelled by the teacher, train the
next student, which should then escalate fewer queries at equal or better cascade accuracy.

    python benchmarks/retraining_loop.py [--config export/configs/clinc150-loop.toml]
        [--work-dir build/retraining-loop] [--set KEY=VALUE ...] [--v2-set KEY=VALUE ...]
        [--v2-name v2] [--reuse] [--results benchmarks/results/retraining_loop]

Run it from the repository root; the config's relative paths start there. Stages:

0. Write the loop's data layout to ``<work-dir>/data/data_full.json`` (CLINC150 format): the
   train split, the test split, and as validation split the last ``--calibration-per-label``
   train queries of each intent, which no student trains on (the config reads at most
   ``data.max_train_per_label`` from the front of the train split). Both gates are calibrated
   there. The real validation split is only traffic, so all of its escalations can train v2.
1. Build student v1 from the config (``teacher.mode = "package"``: distilled against the
   packaged teacher, from a reduced train split), package version 1.
2. Start a gateway on loopback that serves the config's teacher package, and send the whole
   CLINC150 validation split through ``EdgeRuntime`` with v1, one query at a time, with the
   escalation log on and the answer cache off, so that every escalation reaches the teacher
   and the log.
3. Build student v2: the same config plus ``data.extra_train`` = that log, package version 2.
4. Evaluate v1 and v2 on the CLINC150 test split through the runtime and the same gateway
   (``edge_runtime.evaluate``): cascade accuracy, escalation rate (share of queries sent to
   the teacher), and the student alone.
5. Threshold sweep: for several calibration targets, fit each student's threshold on its
   calibration queries, and measure the cascade on test, from
   single-query student logits and the gateway's teacher labels.

Why calibrate on held-out train queries: an earlier layout calibrated on half of the
validation split and logged the other half. v2 then trained on queries of the same split as
its calibration queries, and its gate, fitted there, answered too much locally on test
(docs/retraining.md has the figures).

Writes ``<results>.json`` and ``<results>.md``. ``--set`` overrides a config key for both
builds and ``--v2-set`` for v2 only; a value is read as TOML, else as a string. ``--reuse``
keeps each build of an earlier run in the work folder whose config is unchanged (v1 together
with its traffic and escalation log); without it the work folder is emptied first.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from edge_runtime import encryption, signing  # noqa: E402
from edge_runtime.data import load_split  # noqa: E402
from edge_runtime.errors import ConfigError, EdgeRuntimeError  # noqa: E402
from edge_runtime.escalation_log import EscalationLog, read_all  # noqa: E402
from edge_runtime.evaluate import ProgressLine, evaluate  # noqa: E402
from edge_runtime.gate import softmax  # noqa: E402
from edge_runtime.gateway.server import running_gateway  # noqa: E402
from edge_runtime.metrics import accuracy_figures  # noqa: E402
from edge_runtime.package import TrustPolicy  # noqa: E402
from edge_runtime.runtime import SOURCE_LOCAL, EdgeRuntime  # noqa: E402
from edge_runtime.teacher_client import TeacherClient  # noqa: E402
from export.config import parse_override  # noqa: E402

log = logging.getLogger("retraining_loop")

DEFAULT_CONFIG = "export/configs/clinc150-loop.toml"
DEFAULT_WORK_DIR = "build/retraining-loop"
DEFAULT_DEVICE_KEY = "models/keys/demo-device.key.pem"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
STAGES = 5
CALIBRATION_PER_LABEL = 10
# Calibration targets of the sweep: "local" bounds the share of local answers that disagree
# with the teacher (the build's target), "all" bounds their count as a share of all queries.
SWEEP_TARGETS = (
    ("local", 0.02),
    ("local", 0.015),
    ("local", 0.01),
    ("all", 0.012),
    ("all", 0.01),
    ("all", 0.008),
    ("all", 0.006),
    ("all", 0.004),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/retraining_loop.py",
        description="Build student v1, log its escalations on the validation split, build v2 "
        "from that log and compare both on the test split.",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="build config of v1 (TOML)")
    parser.add_argument(
        "--work-dir",
        default=DEFAULT_WORK_DIR,
        help="folder for both builds and the escalation log (emptied unless --reuse)",
    )
    parser.add_argument(
        "--device-key",
        default=DEFAULT_DEVICE_KEY,
        help="device private key (PEM) that decrypts the student packages",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key in both builds",
    )
    parser.add_argument(
        "--v2-set",
        dest="v2_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key in the v2 build only",
    )
    parser.add_argument("--v2-name", default="v2", help="folder name of the v2 build")
    parser.add_argument(
        "--calibration-per-label",
        type=int,
        default=CALIBRATION_PER_LABEL,
        help="train queries per intent, from the end of the split, that calibrate both gates",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the builds, traffic and log of an earlier run whose configs are unchanged",
    )
    parser.add_argument(
        "--results",
        default=str(RESULTS_DIR / "retraining_loop"),
        help="path of the results without suffix; .json and .md are written",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    for name in ("export", "retraining_loop"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        results = run_loop(args)
    except EdgeRuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_results(results, Path(args.results))
    goal = results["goal"]
    print(
        f"v1 escalated {goal['v1_escalation_rate']:.1%} of test queries at cascade accuracy "
        f"{goal['v1_cascade_accuracy']:.2%}; v2 {goal['v2_escalation_rate']:.1%} at "
        f"{goal['v2_cascade_accuracy']:.2%}; goal {'met' if goal['met'] else 'NOT met'}; "
        f"results in {args.results}.json and .md"
    )
    return 0


def run_loop(args: argparse.Namespace) -> dict:
    """Run the stages and return the results."""
    from export.build import load_data
    from export.config import load_config

    started = time.perf_counter()
    work = Path(args.work_dir)
    log_dir = work / "escalations"
    overrides = dict(parse_override(item) for item in args.overrides)
    v2_overrides = dict(parse_override(item) for item in args.v2_overrides)
    source_config = load_config(args.config, overrides)
    data_dir = work / "data"
    layout = write_loop_data(
        source_config.data.path,
        data_dir,
        source_config.data.max_train_per_label,
        args.calibration_per_label,
    )
    overrides = {**overrides, "data.path": str(data_dir), "data.val_skip_per_label": 0}
    v1_config = load_config(
        args.config, {**overrides, "output.dir": str(work / "v1"), "output.models_dir": ""}
    )
    v2_config = load_config(
        args.config,
        {
            **overrides,
            "output.dir": str(work / args.v2_name),
            "output.models_dir": "",
            "output.version": v1_config.output.version + 1,
            "data.extra_train": [*v1_config.data.extra_train, str(log_dir)],
            **v2_overrides,
        },
    )
    if v1_config.teacher.mode != "package":
        raise ConfigError(
            f"{args.config}: the loop needs teacher.mode = 'package', so that both students "
            "and the gateway share one teacher"
        )
    trust = student_trust(v1_config.package.signer_key, args.device_key)
    seconds: dict[str, float] = {}

    # 1. Student v1.
    stage = time.perf_counter()
    v1_report = reusable_report(work / "v1", v1_config.digest()) if args.reuse else None
    traffic_path = work / "traffic.json"
    if v1_report is not None and traffic_path.is_file() and read_all(log_dir):
        progress(1, f"reusing student v1, its traffic and its escalation log from {work}")
    else:
        for child in work.iterdir():
            if child != data_dir:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        progress(1, f"building student v1 from {args.config}")
        v1_report = run_build(v1_config)
    seconds["build_v1"] = round(time.perf_counter() - stage, 1)
    v1_package = Path(v1_report["packages"]["student"]["path"])

    signer_public = public_key_file(v1_config, work)
    with running_gateway(v1_config.teacher.package, signer_keys=(str(signer_public),)) as gateway:
        # 2. Traffic: the validation split through v1, escalations logged.
        stage = time.perf_counter()
        if traffic_path.is_file():
            traffic = json.loads(traffic_path.read_text())
        else:
            val = load_split(source_config.data.path, source_config.data.val_split)
            progress(
                2,
                f"serving {len(val)} validation queries through v1 with the escalation log on, "
                f"teacher at {gateway.url}",
            )
            traffic = serve_traffic(v1_package, trust, gateway.url, val, log_dir)
            traffic_path.write_text(json.dumps(traffic, indent=2) + "\n")
        seconds["traffic"] = round(time.perf_counter() - stage, 1)

        # 3. Student v2.
        stage = time.perf_counter()
        v2_report = reusable_report(work / args.v2_name, v2_config.digest()) if args.reuse else None
        if v2_report is None:
            progress(3, f"building student v2 with data.extra_train = {log_dir}")
            v2_report = run_build(v2_config)
        else:
            progress(3, f"reusing student v2 from {work / args.v2_name}")
        seconds["build_v2"] = round(time.perf_counter() - stage, 1)
        v2_package = Path(v2_report["packages"]["student"]["path"])

        # 4. Both students on the test split.
        stage = time.perf_counter()
        test = load_split(v1_config.data.path, v1_config.data.test_split)
        evaluations = {}
        for name, package in [("v1", v1_package), ("v2", v2_package)]:
            progress(4, f"evaluating {name} on {len(test)} test queries through the runtime")
            evaluations[name] = evaluate_package(package, trust, gateway.url, test)
        seconds["evaluate"] = round(time.perf_counter() - stage, 1)

        # 5. Thresholds for other calibration targets, fitted on the calibration queries.
        stage = time.perf_counter()
        _, calibration_queries, _ = load_data(v1_config)
        progress(
            5,
            f"threshold sweep: {len(calibration_queries)} calibration queries, "
            f"{len(test)} test queries, {len(SWEEP_TARGETS)} targets",
        )
        sweep = threshold_sweep(
            {"v1": v1_package, "v2": v2_package}, trust, gateway.url, calibration_queries, test
        )
        seconds["sweep"] = round(time.perf_counter() - stage, 1)

    seconds["total"] = round(time.perf_counter() - started, 1)
    return assemble_results(
        args, v1_config, v1_report, v2_report, traffic, evaluations, sweep, seconds, layout
    )


def write_loop_data(
    source: str, folder: Path, train_per_label: int, calibration_per_label: int
) -> dict:
    """Write the loop's CLINC150 file (see stage 0 of the module docstring) and return counts.

    The calibration queries are the last ``calibration_per_label`` train queries of each
    intent; ``train_per_label`` queries from the front must not reach them.
    """
    if calibration_per_label <= 0:
        raise ConfigError(
            f"--calibration-per-label is {calibration_per_label}; it must be at least 1"
        )
    if train_per_label <= 0:
        raise ConfigError(
            "the loop needs data.max_train_per_label > 0, so that train queries are left over "
            "to calibrate on"
        )
    source_path = Path(source)
    if source_path.is_dir():
        source_path = source_path / "data_full.json"
    raw = json.loads(source_path.read_text())
    layout = {
        "train": [],
        "val": [],
        "test": raw["test"],
        "oos_train": [],
        "oos_val": [],
        "oos_test": raw["oos_test"],
    }
    for prefix in ("", "oos_"):
        by_label: dict[str, list] = {}
        for pair in raw[f"{prefix}train"]:
            by_label.setdefault(pair[1], []).append(pair)
        for label, pairs in by_label.items():
            if len(pairs) < train_per_label + calibration_per_label:
                raise ConfigError(
                    f"intent {label!r} has {len(pairs)} train queries; the loop needs "
                    f"{train_per_label} to train plus {calibration_per_label} to calibrate. "
                    "Lower data.max_train_per_label or --calibration-per-label"
                )
            layout[f"{prefix}train"] += pairs[:-calibration_per_label]
            layout[f"{prefix}val"] += pairs[-calibration_per_label:]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "data_full.json"
    text = json.dumps(layout) + "\n"
    if not target.is_file() or target.read_text() != text:
        target.write_text(text)
    return {
        "source": source,
        "train_per_label": train_per_label,
        "calibration_per_label": calibration_per_label,
        "calibration_queries": len(layout["val"]) + len(layout["oos_val"]),
    }


def progress(stage: int, message: str) -> None:
    print(f"[{stage}/{STAGES}] {message}", file=sys.stderr, flush=True)


def student_trust(signer_key_path: str, device_key_path: str) -> TrustPolicy:
    """Trust the public half of the build's signer key; decrypt with the device key."""
    try:
        signer = signing.load_private_key_pem(Path(signer_key_path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"package.signer_key: cannot read {signer_key_path}: {exc}") from None
    return TrustPolicy(
        trusted_keys=(signer.public_key(),), device_key=encryption.load_private_key(device_key_path)
    )


def public_key_file(config, work: Path) -> Path:
    """Return a PEM file with the public key the gateway verifies the teacher package with."""
    from cryptography.hazmat.primitives import serialization

    if config.teacher.package_signer_key:
        return Path(config.teacher.package_signer_key)
    signer = signing.load_private_key_pem(Path(config.package.signer_key).read_bytes())
    path = work / "teacher-signer.pub.pem"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        signer.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def run_build(config) -> dict:
    from export.build import build

    return build(config)


def reusable_report(folder: Path, digest: str) -> dict | None:
    """Return the build report in ``folder`` if it was built from a config with ``digest``."""
    report_path = folder / "build_report.json"
    if not report_path.is_file():
        return None
    report = json.loads(report_path.read_text())
    if report["config_sha256"] != digest:
        log.info("%s was built from another config; building again", folder)
        return None
    return report


def serve_traffic(
    package: Path, trust: TrustPolicy, teacher_url: str, examples: list, log_dir: Path
) -> dict:
    """Send ``examples`` through the student ``package`` one at a time, with the escalation
    log on and no answer cache; return the traffic figures."""
    sources: Counter[str] = Counter()
    predicted = []
    bar = ProgressLine("traffic", len(examples))
    # EscalationLog takes a path that does not exist as a file name, so create the folder.
    log_dir.mkdir(parents=True, exist_ok=True)
    with (
        EscalationLog(log_dir) as escalations,
        EdgeRuntime.load(
            package,
            teacher_url=teacher_url,
            trust=trust,
            answer_cache=False,
            escalation_log=escalations,
        ) as runtime,
    ):
        for done, example in enumerate(examples, start=1):
            answer = runtime.answer(example.text)
            sources[answer.source] += 1
            predicted.append(answer.label)
            bar.update(done)
        dropped = escalations.records_dropped
    records = read_all(log_dir)
    return {
        "split": "validation",
        "n": len(examples),
        "sources": dict(sorted(sources.items())),
        "escalation_rate": 1.0 - sources[SOURCE_LOCAL] / len(examples),
        "cascade": accuracy_figures(predicted, [e.label for e in examples]),
        "log_records": len(records),
        "log_records_dropped": dropped,
        "log_sources": dict(sorted(Counter(r.source for r in records).items())),
    }


def evaluate_package(package: Path, trust: TrustPolicy, teacher_url: str, examples: list) -> dict:
    with (
        EdgeRuntime.load(
            package, teacher_url=teacher_url, trust=trust, answer_cache=False
        ) as runtime,
        TeacherClient(teacher_url) as teacher,
    ):
        result = evaluate(runtime, teacher, examples)
    result["escalation_rate"] = 1.0 - result["local_fraction"]
    return result


def threshold_sweep(
    packages: dict[str, Path], trust: TrustPolicy, teacher_url: str, validation: list, test: list
) -> list[dict]:
    """Fit each student's threshold on ``validation`` for every target in ``SWEEP_TARGETS``
    (with the temperature of its package), and return the cascade figures on both splits.

    Student logits come one query at a time from the runtime's session, as the gate sees
    them, and teacher labels from the gateway.
    """
    from export.calibrate import choose_threshold

    splits = {"validation": validation, "test": test}
    with TeacherClient(teacher_url) as teacher:
        teacher_labels = {
            name: [teacher.predict(e.text).label for e in examples]
            for name, examples in splits.items()
        }
    rows = []
    for version, package in packages.items():
        with EdgeRuntime.load(package, trust=trust) as runtime:
            labels = list(runtime.student.labels)
            temperature = runtime.gate.temperature
            logits = {
                name: np.stack([runtime.student.predict(e.text).logits for e in examples])
                for name, examples in splits.items()
            }
        # (queries,) calibrated top-1 probability and top-1 label per split
        confidence = {
            name: softmax(values, temperature).max(axis=1) for name, values in logits.items()
        }
        student = {
            name: [labels[i] for i in values.argmax(axis=1)] for name, values in logits.items()
        }
        agrees = np.array(
            [
                s == t
                for s, t in zip(student["validation"], teacher_labels["validation"], strict=True)
            ]
        )
        for over, target in SWEEP_TARGETS:
            threshold = choose_threshold(confidence["validation"], agrees, target, over=over)
            row = {"version": version, "over": over, "target": target, "threshold": threshold}
            for name, examples in splits.items():
                local = (confidence[name] >= threshold) & (threshold < 1.0)
                answers = [
                    s if is_local else t
                    for s, t, is_local in zip(
                        student[name], teacher_labels[name], local, strict=True
                    )
                ]
                figures = accuracy_figures(answers, [e.label for e in examples])
                row[name] = {
                    "accuracy": figures["accuracy"],
                    "escalation_rate": 1.0 - float(local.mean()),
                }
            rows.append(row)
    return rows


def build_summary(report: dict) -> dict:
    """Return the parts of a build report that the loop's results show."""
    student = report["stages"]["student"]
    calibration = report["stages"]["calibration"]
    return {
        "package": report["packages"]["student"]["path"],
        "version": report["config"]["output"]["version"],
        "train": report["data"]["train"],
        "validation": report["data"]["validation"],
        "extra_train": report["data"]["extra_train"],
        "student": {
            "initialised_from": student["initialised_from"],
            "examples": student["examples"],
            "epochs": report["config"]["student"]["epochs"],
            "steps": student["distillation"]["steps"],
            "test_int8": student["test_int8"],
        },
        "calibration": {
            key: calibration[key]
            for key in (
                "temperature",
                "threshold",
                "n",
                "local_fraction",
                "local_disagreement",
                "cascade_accuracy",
                "teacher_accuracy",
            )
        },
        "cascade_preview_test": report["stages"]["cascade_preview_test"],
        "seconds": report["seconds"],
    }


def machine_description() -> dict:
    from edge_runtime.bench import this_cpu

    cpu = this_cpu()["cpu_model"]
    import onnxruntime
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def assemble_results(
    args: argparse.Namespace,
    config,
    v1_report: dict,
    v2_report: dict,
    traffic: dict,
    evaluations: dict,
    sweep: list[dict],
    seconds: dict,
    layout: dict,
) -> dict:
    v1, v2 = evaluations["v1"], evaluations["v2"]
    goal = {
        "v1_escalation_rate": v1["escalation_rate"],
        "v2_escalation_rate": v2["escalation_rate"],
        "v1_cascade_accuracy": v1["accuracy"],
        "v2_cascade_accuracy": v2["accuracy"],
        "fewer_escalations": v2["escalation_rate"] < v1["escalation_rate"],
        "cascade_accuracy_not_lower": v2["accuracy"] >= v1["accuracy"],
    }
    goal["met"] = goal["fewer_escalations"] and goal["cascade_accuracy_not_lower"]
    command = "python benchmarks/retraining_loop.py"
    if args.config != DEFAULT_CONFIG:
        command += f" --config {args.config}"
    command += "".join(f" --set {item}" for item in args.overrides)
    command += "".join(f" --v2-set {item}" for item in args.v2_overrides)
    if args.calibration_per_label != CALIBRATION_PER_LABEL:
        command += f" --calibration-per-label {args.calibration_per_label}"
    if args.v2_name != "v2":
        command += f" --v2-name {args.v2_name}"
    if args.reuse:
        command += " --reuse"
    if Path(args.results).resolve() != (RESULTS_DIR / "retraining_loop").resolve():
        command += f" --results {args.results}"
    return {
        "command": command,
        "reused": args.reuse,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "config": {
            "path": args.config,
            "overrides": args.overrides,
            "v2_overrides": args.v2_overrides,
            "v1_sha256": v1_report["config_sha256"],
            "v2_sha256": v2_report["config_sha256"],
        },
        "teacher_package": config.teacher.package,
        "data_layout": layout,
        "seconds": seconds,
        "v1": build_summary(v1_report),
        "traffic": traffic,
        "v2": build_summary(v2_report),
        "test": {"v1": v1, "v2": v2},
        "goal": goal,
        "threshold_sweep": sweep,
    }


def write_results(results: dict, base: Path) -> None:
    base.parent.mkdir(parents=True, exist_ok=True)
    # Not with_suffix: a base such as retraining_loop.weight3 would lose its last part.
    (base.parent / f"{base.name}.json").write_text(
        json.dumps(results, indent=2, sort_keys=True) + "\n"
    )
    (base.parent / f"{base.name}.md").write_text(render_markdown(results))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f}%"


def render_markdown(results: dict) -> str:
    v1, v2 = results["test"]["v1"], results["test"]["v2"]
    traffic, extra = results["traffic"], results["v2"]["extra_train"]
    machine, seconds = results["machine"], results["seconds"]
    skipped = (
        ", ".join(f"{count} {reason}" for reason, count in extra["skipped"].items() if count)
        or "none"
    )
    lines = [
        "# Retraining loop on CLINC150",
        "",
        f"Command: `{results['command']}`. Machine: {machine['cores']} vCPU {machine['machine']}"
        f" ({machine['cpu']}), Python {machine['python']}, torch {machine['torch']}, "
        f"onnxruntime {machine['onnxruntime']}. This run took {seconds['total'] / 60:.1f} "
        f"minutes (build v1 {seconds['build_v1']:.0f} s, traffic {seconds['traffic']:.0f} s, "
        f"build v2 {seconds['build_v2']:.0f} s, evaluation {seconds['evaluate']:.0f} s, sweep "
        f"{seconds['sweep']:.0f} s)"
        + (
            "; with --reuse, a stage of a few seconds reused an earlier run's output"
            if results.get("reused")
            else ""
        )
        + f". Finished {results['finished_at']}.",
        "",
        "## Test split through the runtime and a gateway on loopback",
        "",
        "| student | escalation rate | cascade accuracy | in-scope | out-of-scope recall | "
        "student alone | teacher alone |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, figures in (("v1", v1), ("v2", v2)):
        lines.append(
            f"| {name} | {_pct(figures['escalation_rate'])} | {_pct(figures['accuracy'])} | "
            f"{_pct(figures['in_scope_accuracy'])} | {_pct(figures['oos_recall'])} | "
            f"{_pct(figures['baselines']['student']['accuracy'])} | "
            f"{_pct(figures['baselines']['teacher']['accuracy'])} |"
        )
    goal = results["goal"]
    lines += [
        "",
        f"{v1['n']} test queries. Goal (v2 escalates fewer queries at equal or better cascade "
        f"accuracy): **{'met' if goal['met'] else 'not met'}**.",
        "",
        "## Stages",
        "",
        f"- v1: {results['v1']['train']} train queries, "
        f"{results['v1']['student']['initialised_from']}; gate threshold "
        f"{results['v1']['calibration']['threshold']:.4f} (T = "
        f"{results['v1']['calibration']['temperature']:.3f}) on "
        f"{results['v1']['calibration']['n']} calibration queries (held-out train queries, "
        f"the last {results['data_layout']['calibration_per_label']} of each intent).",
        f"- Traffic: {traffic['n']} validation queries through v1, escalation rate "
        f"{_pct(traffic['escalation_rate'])}, sources {traffic['sources']}; "
        f"{traffic['log_records']} records in the escalation log.",
        f"- v2: {extra['read']} log records read, {extra['used']} used as extra training "
        f"examples (weight {extra['weight']}), skipped: {skipped}. Gate threshold "
        f"{results['v2']['calibration']['threshold']:.4f} (T = "
        f"{results['v2']['calibration']['temperature']:.3f}).",
        "",
        *_sweep_lines(results["threshold_sweep"]),
    ]
    return "\n".join(lines)


def _sweep_lines(sweep: list[dict]) -> list[str]:
    lines = [
        "## Threshold sweep",
        "",
        "Each threshold is fitted on the calibration queries of the gate, then "
        "applied to test. Target `local`: at most that share of the local answers disagree with "
        "the teacher (the build's target). Target `all`: the local answers that disagree with "
        "the teacher are at most that share of all queries.",
        "",
        "| target | v1 threshold | v1 escalation | v1 cascade accuracy | v2 threshold | "
        "v2 escalation | v2 cascade accuracy | v2 - v1 accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = {(row["version"], row["over"], row["target"]): row for row in sweep}
    for over, target in dict.fromkeys((row["over"], row["target"]) for row in sweep):
        v1, v2 = rows[("v1", over, target)], rows[("v2", over, target)]
        difference = (v2["test"]["accuracy"] - v1["test"]["accuracy"]) * 100
        lines.append(
            f"| {over} {target:.1%} | {v1['threshold']:.4f} | "
            f"{_pct(v1['test']['escalation_rate'])} | {_pct(v1['test']['accuracy'])} | "
            f"{v2['threshold']:.4f} | {_pct(v2['test']['escalation_rate'])} | "
            f"{_pct(v2['test']['accuracy'])} | {difference:+.2f} points |"
        )
    lines.append("")
    return lines


if __name__ == "__main__":
    sys.exit(main())
