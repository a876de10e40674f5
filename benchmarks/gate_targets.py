"""Calibration target against local share and cascade accuracy, for a finished build.

The build fits its gate on validation so that at most ``[calibration] max_disagreement`` of the
local answers disagree with the int8 teacher. For each target in ``--targets`` this command fits
the gate again from the build's int8 models, as ``export build`` does, and reports on validation
and test the share of queries that the student answers locally and the accuracy of the cascade
(the int8 student when local, else the int8 teacher), with in-scope accuracy and out-of-scope
recall on test when the data has an out-of-scope label. The models run one query at a time,
as on a device. ``--score`` compares gate scores; the default is the score of the build's
gate, read from its ``build_report.json`` (else the config's ``[calibration] score``). The row
"test share N%" uses the threshold that answers ``--local-share`` of test locally, so it is
fitted on test and is only a point of the curve. The rows "teacher only" and "student only"
are the two ends of the curve.

    python benchmarks/gate_targets.py --config export/configs/banking77.toml [--build-dir DIR]
        [--targets 0.005,0.01,0.015,0.02,0.03,0.04] [--local-share 0.85]
        [--score max_probability|logit_margin]
        [--results benchmarks/results/gate_targets_banking77]

Run it from the repository root with the export extra installed, after ``python -m export
build --config CONFIG``. Prints a markdown table, and with ``--results P`` writes P.json and P.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from edge_runtime.errors import ConfigError, EdgeRuntimeError  # noqa: E402
from edge_runtime.gate import MAX_PROBABILITY, SCORE_KINDS, gate_scores  # noqa: E402
from export.calibrate import calibrate, fit_temperature  # noqa: E402

DEFAULT_TARGETS = "0.005,0.01,0.015,0.02,0.03,0.04"


def split_figures(
    local: np.ndarray,
    student: np.ndarray,
    teacher: np.ndarray,
    expected: np.ndarray,
    oos_index: int | None,
) -> dict:
    """Figures of one split for a local mask and the student's and teacher's label indices.
    With ``oos_index`` also in-scope accuracy and out-of-scope recall, None without such
    queries."""
    cascade = np.where(local, student, teacher) == expected
    figures = {
        "local_share": float(local.mean()),
        "local_disagreement": float((student != teacher)[local].mean()) if local.any() else 0.0,
        "cascade_accuracy": float(cascade.mean()),
        "teacher_accuracy": float((teacher == expected).mean()),
        "student_accuracy": float((student == expected).mean()),
    }
    if oos_index is not None:
        out_of_scope = expected == oos_index
        in_scope = ~out_of_scope
        figures["in_scope_accuracy"] = float(cascade[in_scope].mean()) if in_scope.any() else None
        figures["oos_recall"] = float(cascade[out_of_scope].mean()) if out_of_scope.any() else None
    return figures


def gate_rows(
    logits: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    targets: list[float],
    local_share: float,
    oos_index: int | None = None,
    score: str = MAX_PROBABILITY,
) -> list[dict]:
    """Compute one row per gate from the logits of the int8 models.

    ``logits`` maps "student validation", "teacher validation", "student test" and "teacher
    test" to (queries, labels) arrays, and ``labels`` maps "validation" and "test" to the
    expected label indices. Every row uses the temperature fitted on validation, which does
    not depend on the target, and the gate score ``score``.
    """
    temperature = fit_temperature(logits["student validation"], labels["validation"])
    student = {s: logits[f"student {s}"].argmax(1) for s in labels}
    teacher = {s: logits[f"teacher {s}"].argmax(1) for s in labels}
    confidence = {s: gate_scores(logits[f"student {s}"], temperature, score) for s in labels}

    def row(name: str, target: float | None, threshold: float) -> dict:
        figures = {}
        for split in labels:
            # The gate of edge_runtime.gate: a threshold of 1.0 turns local answers off.
            local = (confidence[split] >= threshold) & (threshold < 1.0)
            figures[split] = split_figures(
                local, student[split], teacher[split], labels[split], oos_index
            )
        return {
            "gate": name,
            "target": target,
            "threshold": threshold,
            "temperature": temperature,
            "score": score,
            **figures,
        }

    rows = [row("teacher only", None, 1.0)]
    for target in targets:
        fitted = calibrate(
            logits["student validation"], labels["validation"], teacher["validation"], target,
            score,
        )
        rows.append(row(f"target {target:.1%}", target, fitted.threshold))
    # The lowest threshold that still escalates (1 - local_share) of the test queries.
    cut = float(np.quantile(confidence["test"], 1.0 - local_share))
    rows.append(row(f"test share {local_share:.0%}", None, cut))
    rows.append(row("student only", None, 0.0))
    return rows


def required_file(build_dir: Path, name: str, config_path: str) -> Path:
    path = build_dir / name
    if not path.is_file():
        raise ConfigError(
            f"{name} not found in {build_dir}; `python -m export build --config "
            f"{config_path}` writes it (set --build-dir if the build is elsewhere)"
        )
    return path


def build_logits(config_path: str, build_dir: str | None) -> dict:
    """Read the config's splits as the build did and run the build's int8 models on
    validation and test."""
    from tokenizers import Tokenizer

    from export.build import DEVICE_BATCH_SIZE, STUDENT_TOKENIZER, load_data
    from export.config import load_config
    from export.dataset import out_of_scope_label
    from export.onnx_export import onnx_logits, session_from_file

    config = load_config(config_path)
    folder = Path(build_dir or config.output.dir)
    models = {
        role: required_file(folder, f"{role}-int8.onnx", config_path)
        for role in ("student", "teacher")
    }
    teacher_tokenizer = required_file(folder, "tokenizer.json", config_path)
    student_tokenizer = folder / STUDENT_TOKENIZER
    tokenizers = {
        "student": student_tokenizer if student_tokenizer.is_file() else teacher_tokenizer,
        "teacher": teacher_tokenizer,
    }

    train, val, test = load_data(config)
    names = sorted({e.label for e in train})
    index = {label: i for i, label in enumerate(names)}
    splits = {"validation": val, "test": test}
    labels = {s: np.array([index[e.label] for e in examples]) for s, examples in splits.items()}
    sizes = {"labels": len(names), "validation": len(val), "test": len(test)}
    progress(f"data: {len(names)} labels, {len(val)} validation, {len(test)} test")
    report_path = folder / "build_report.json"
    build_score = config.calibration.score
    if report_path.is_file():
        report = json.loads(report_path.read_text(encoding="utf-8"))
        calibration = report.get("stages", {}).get("calibration")
        if calibration is not None:
            # Reports from before the score was configurable have none: their gate used the
            # top-1 probability.
            build_score = calibration.get("score", MAX_PROBABILITY)
        built = report.get("data", {})
        if any(built.get(key) != count for key, count in sizes.items()):
            # The figures still describe these models, but on other splits than the build's.
            progress(
                f"warning: {report_path} records other split sizes than {sizes}; "
                "the config's [data] has changed since the build"
            )

    logits = {}
    for role, model in models.items():
        tokenizer = Tokenizer.from_file(str(tokenizers[role]))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=config.teacher.max_length)
        session = session_from_file(model)
        for split, examples in splits.items():
            started = time.perf_counter()
            logits[f"{role} {split}"] = onnx_logits(
                session, tokenizer, [e.text for e in examples], batch_size=DEVICE_BATCH_SIZE
            )
            progress(f"{model.name} on {split}: {time.perf_counter() - started:.1f} s")
    oos = out_of_scope_label(config.data)
    return {
        "logits": logits,
        "labels": labels,
        "build_dir": str(folder),
        "tokenizers": {role: path.name for role, path in tokenizers.items()},
        "oos_label": oos if oos in index else None,
        "oos_index": index.get(oos) if oos else None,
        "config_target": config.calibration.max_disagreement,
        "build_score": build_score,
        "sizes": sizes,
    }


def render_markdown(results: dict) -> str:
    has_oos = results["oos_label"] is not None
    machine = results["machine"]
    first = results["rows"][0]
    lines = [
        f"# Gate targets: {results['config']}",
        "",
        f"Command: `{results['command']}`. Build: `{results['build_dir']}` (student tokenizer "
        f"`{results['tokenizers']['student']}`). Machine: {machine['machine']} "
        f"({machine['cpu']}), Python {machine['python']}, onnxruntime {machine['onnxruntime']}. "
        f"{results['seconds']:.0f} s, finished {results['finished_at']}.",
        "",
        f"{results['sizes']['labels']} labels, {results['sizes']['validation']} validation and "
        f"{results['sizes']['test']} test queries; the config's target is "
        f"{results['config_target']:.1%}, and the build's gate uses `{results['build_score']}`. "
        "Gate score of every row: "
        f"`{first['score']}`, temperature {first['temperature']:.3f}, fitted on validation. "
        "`local`: share answered by the int8 student. `disagree`: share of the "
        "local answers that differ from the int8 teacher. `cascade`: accuracy of the student "
        "when local, else the int8 teacher. `test share` is fitted on test.",
        "",
    ]
    header = [
        "gate",
        "threshold",
        "val local",
        "val disagree",
        "val cascade",
        "test local",
        "test disagree",
        "test cascade",
    ]
    header += ["test in-scope", "test OOS recall"] if has_oos else []
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in results["rows"]:
        val, test = row["validation"], row["test"]
        keys = ["local_share", "local_disagreement", "cascade_accuracy"]
        cells = [row["gate"], f"{row['threshold']:.4f}"]
        cells += [percent(val[key]) for key in keys] + [percent(test[key]) for key in keys]
        if has_oos:
            cells += [percent(test["in_scope_accuracy"]), percent(test["oos_recall"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def percent(share: float | None) -> str:
    return "" if share is None else f"{100 * share:.2f}"


def machine_description() -> dict:
    import onnxruntime

    from edge_runtime.bench import this_cpu

    cpu = this_cpu()
    return {
        "cpu": cpu["cpu_model"],
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }


def progress(message: str) -> None:
    print(f"gate_targets: {message}", file=sys.stderr, flush=True)


def parse_targets(text: str) -> list[float]:
    try:
        targets = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--targets {text!r}: expected comma-separated numbers") from None
    if not targets or not all(0.0 <= t < 1.0 for t in targets):
        raise ConfigError(f"--targets {text!r}: expected shares in [0, 1), such as 0.01,0.02")
    return targets


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python benchmarks/gate_targets.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--config",
        required=True,
        help="TOML config of the build, such as export/configs/banking77.toml",
    )
    parser.add_argument("--build-dir", help="folder of the build; default: the config's output.dir")
    parser.add_argument(
        "--targets",
        default=DEFAULT_TARGETS,
        help="calibration targets (max_disagreement), comma-separated shares",
    )
    parser.add_argument(
        "--local-share",
        type=float,
        default=0.85,
        help="share of test queries answered locally in the 'test share' row",
    )
    parser.add_argument(
        "--score",
        choices=SCORE_KINDS,
        help="gate score of every row; default: the score of the build's gate",
    )
    parser.add_argument("--results", help="write RESULTS.json and RESULTS.md (path without suffix)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        targets = parse_targets(args.targets)
        if not 0.0 < args.local_share <= 1.0:
            raise ConfigError(f"--local-share {args.local_share}: expected a share in (0, 1]")
        data = build_logits(args.config, args.build_dir)
    except EdgeRuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    rows = gate_rows(
        data.pop("logits"),
        data.pop("labels"),
        targets,
        args.local_share,
        data.pop("oos_index"),
        args.score or data["build_score"],
    )
    results = {
        "command": shlex.join(["python", "benchmarks/gate_targets.py", *argv]),
        "config": args.config,
        **data,
        "local_share": args.local_share,
        "rows": rows,
        "machine": machine_description(),
        "seconds": round(time.perf_counter() - started, 1),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    markdown = render_markdown(results)
    print(markdown, end="")
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.results}.json").write_text(json.dumps(results, indent=2) + "\n")
        Path(f"{args.results}.md").write_text(markdown)
        progress(f"wrote {args.results}.json and {args.results}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
