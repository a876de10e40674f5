"""Build reports: the full figures as JSON and a readable summary as Markdown."""

from __future__ import annotations

import json
from pathlib import Path


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f}%"


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def write_reports(report: dict, out: Path) -> None:
    (out / "build_report.json").write_text(
        json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"
    )
    (out / "build_report.md").write_text(render_markdown(report))


def render_markdown(report: dict) -> str:
    stages = report["stages"]
    teacher, student = stages["teacher"], stages["student"]
    calibration, preview = stages["calibration"], stages["cascade_preview_test"]
    data = report["data"]
    from_package = teacher["mode"] == "package"
    lines = [
        "# Build report",
        "",
        f"Data: `{data['path']}`: {data['labels']} labels; {data['train']} train, "
        f"{data['validation']} validation, {data['test']} test queries. "
        f"Config SHA-256 `{report['config_sha256'][:16]}`. Build time {report['seconds']} s.",
        "",
        *_extra_train_lines(data.get("extra_train") or {}),
        "## Test split",
        "",
        "| model | accuracy | in-scope accuracy | out-of-scope recall | size |",
        "| --- | --- | --- | --- | --- |",
    ]
    if from_package:
        rows = [("teacher int8 (package)", teacher["test_int8"], teacher["size_bytes"])]
    else:
        rows = [
            ("teacher fp32", teacher["test_fp32"], teacher["size_bytes"]["fp32"]),
            ("teacher int8", teacher["test_int8"], teacher["size_bytes"]["int8"]),
        ]
    rows += [
        ("student fp32", student["test_fp32"], student["size_bytes"]["fp32"]),
        ("student int8", student["test_int8"], student["size_bytes"]["int8"]),
    ]
    for name, figures, size in rows:
        lines.append(
            f"| {name} | {_pct(figures['accuracy'])} | {_pct(figures['in_scope_accuracy'])} | "
            f"{_pct(figures['oos_recall'])} | {_mb(size)} |"
        )
    lines += [
        f"| cascade (int8 student, int8 teacher) | {_pct(preview['accuracy'])} | "
        f"{_pct(preview['in_scope_accuracy'])} | {_pct(preview['oos_recall'])} | "
        f"{_pct(preview['local_fraction'])} answered locally |",
        "",
        "The int8 and cascade rows come from one query per ONNX Runtime call, as on a device; "
        "`edge-runtime eval` measures the cascade through the runtime and a gateway.",
        "",
        "## Checks",
        "",
    ]
    if not from_package:
        lines += [
            f"- Teacher ONNX vs PyTorch: max absolute logit difference "
            f"{teacher['onnx_check']['max_abs_diff']:.2e} on {teacher['onnx_check']['texts']} "
            f"texts (tolerance {teacher['onnx_check']['tolerance']:.0e}).",
        ]
    lines += [
        f"- Student ONNX vs PyTorch: max absolute logit difference "
        f"{student['onnx_check']['max_abs_diff']:.2e} on {student['onnx_check']['texts']} texts "
        f"(tolerance {student['onnx_check']['tolerance']:.0e}).",
        _int8_agreement_line(teacher, student, from_package),
        "",
        "## Calibration and gate (validation split)",
        "",
        f"- Temperature {calibration['temperature']:.3f}: NLL {calibration['nll_before']:.3f} -> "
        f"{calibration['nll_after']:.3f}, ECE {calibration['ece_before']:.3f} -> "
        f"{calibration['ece_after']:.3f}.",
        f"- Threshold {calibration['threshold']:.4f} on the gate score "
        f"`{calibration.get('score', 'max_probability')}` for the target: "
        f"{calibration['target']}.",
        f"- At that threshold: {_pct(calibration['local_fraction'])} answered locally, "
        f"{_pct(calibration['local_disagreement'])} of them disagree with the teacher; cascade "
        f"accuracy {_pct(calibration['cascade_accuracy'])} vs teacher "
        f"{_pct(calibration['teacher_accuracy'])}.",
        "",
        "## Models",
        "",
        _teacher_line(teacher),
        f"- Student: {student['initialised_from']}, {student['parameters']:,} parameters, "
        f"distilled at T={student['distillation']['temperature']} with "
        f"alpha={student['distillation']['alpha']}"
        + (f"; feed-forward width {student['intermediate_size']}"
           if student.get("intermediate_size") else "")
        + (f"; word embeddings at rank {student['embedding_rank']}"
           if student.get("embedding_rank") else "")
        + (f"; {student['examples']['transfer']:,} unlabelled transfer sentences"
           if student.get("examples", {}).get("transfer") else "")
        + (f"; {student['examples']['augmented']:,} variants of training queries"
           if student.get("examples", {}).get("augmented") else "")
        + (f"; vocabulary trimmed to {student['vocabulary']['kept']:,} of "
           f"{student['vocabulary']['original']:,} tokens" if student.get("vocabulary") else "")
        + ("; no [CLS] and [SEP]"
           if (student.get("vocabulary") or {}).get("special_tokens") is False else "")
        + ".",
        f"- Packages: student {_mb(report['packages']['student']['size_bytes'])}, teacher "
        f"{_mb(report['packages']['teacher']['size_bytes'])}"
        + (" (reused, not rebuilt)." if from_package else "."),
        "",
    ]
    return "\n".join(lines)


def _teacher_line(teacher: dict) -> str:
    if teacher["mode"] == "package":
        return (f"- Teacher: package `{teacher['package']}` ({teacher['name']} version "
                f"{teacher['version']}, {teacher['model']}, signer key "
                f"{teacher['signer_key_id']}), not retrained; {teacher['labels_used']} of its "
                f"{teacher['labels_in_package']} labels used.")
    return (f"- Teacher: {teacher['model']} ({teacher['mode']}), "
            f"{teacher['parameters']:,} parameters.")


def _int8_agreement_line(teacher: dict, student: dict, from_package: bool) -> str:
    if from_package:
        return (f"- int8 vs fp32 top-1 agreement on test: student "
                f"{_pct(student['int8_fp32_agreement'])} (the packaged teacher is int8 only).")
    return (f"- int8 vs fp32 top-1 agreement on test: teacher "
            f"{_pct(teacher['int8_fp32_agreement'])}, student "
            f"{_pct(student['int8_fp32_agreement'])}.")


def _extra_train_lines(extra: dict) -> list[str]:
    """Return the escalation-log paragraph, or no lines when the build read no logs."""
    if not extra.get("paths"):
        return []
    skipped = [f"{count} {reason}" for reason, count in extra["skipped"].items() if count]
    return [
        f"Escalation logs (`data.extra_train`): {extra['read']} records read from "
        f"{len(extra['files'])} file(s), {extra['used']} used as extra student examples "
        f"(weight {extra['weight']}, {extra['labels']} labels), "
        f"{extra['read'] - extra['used']} skipped"
        + (f": {', '.join(skipped)}." if skipped else "."),
        "",
    ]
