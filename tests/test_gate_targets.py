"""benchmarks/gate_targets.py: the gate rows computed from small logit arrays.

Each row of logits is the margin in the predicted label's column and 0 elsewhere. So the
calibrated top-1 probability grows with the margin at any temperature, and the queries that a
threshold keeps local follow from the margins alone.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.errors import ConfigError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gate_targets.py"


@pytest.fixture(scope="module")
def gate_targets():
    spec = importlib.util.spec_from_file_location("gate_targets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def margin_logits(predicted: list[int], margins: list[float]) -> np.ndarray:
    logits = np.zeros((len(predicted), 3))
    logits[np.arange(len(predicted)), predicted] = margins
    return logits


# Validation, most confident first (margins 10 down to 1). The student disagrees with the
# teacher on queries 2 and 6, so the share of disagreeing local answers over the first k+1
# queries is 0, 0, 1/3, 1/4, 1/5, 1/6, 2/7, 2/8, 2/9, 2/10.
VAL_STUDENT = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
VAL_TEACHER = [0, 1, 1, 1, 0, 1, 1, 1, 0, 1]
VAL_EXPECTED = [0, 1, 1, 1, 0, 1, 1, 1, 0, 0]  # the teacher is wrong on query 9 only
VAL_MARGINS = [10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]

# Test, margins 9.5, 7, 4, 3 and 0.5. The student is right on queries 0, 1 and 4, the teacher
# on 2, 3 and 4. Label 2 is the out-of-scope label in the OOS tests.
TEST_STUDENT = [0, 2, 1, 0, 0]
TEST_TEACHER = [1, 0, 2, 1, 0]
TEST_EXPECTED = [0, 2, 2, 1, 0]
TEST_MARGINS = [9.5, 7.0, 4.0, 3.0, 0.5]


def compute_rows(module, oos_index=None, score="max_probability"):
    logits = {
        "student validation": margin_logits(VAL_STUDENT, VAL_MARGINS),
        "teacher validation": margin_logits(VAL_TEACHER, [5.0] * 10),
        "student test": margin_logits(TEST_STUDENT, TEST_MARGINS),
        "teacher test": margin_logits(TEST_TEACHER, [5.0] * 5),
    }
    labels = {"validation": np.array(VAL_EXPECTED), "test": np.array(TEST_EXPECTED)}
    rows = module.gate_rows(logits, labels, [0.0, 0.18, 0.25], 0.6, oos_index, score)
    return {row["gate"]: row for row in rows}


def test_rows_in_order(gate_targets):
    rows = compute_rows(gate_targets)

    assert list(rows) == [
        "teacher only",
        "target 0.0%",
        "target 18.0%",
        "target 25.0%",
        "test share 60%",
        "student only",
    ]


@pytest.mark.parametrize(
    ("gate", "val_local", "val_cascade", "test_local", "test_cascade"),
    [
        # Target 0: queries 0-1 local; validation 2 + 7 of the teacher's 8 right.
        # Test: margins >= 9 are local, so query 0 (right) + 3 of the teacher's 4.
        ("target 0.0%", 0.2, 0.9, 0.2, 0.8),
        # Target 18%: 1/6 is the last share at or under it, so queries 0-5 are local.
        # Validation 5 of 6 local + 3 of 4 escalated right. Test: margins >= 5 are local,
        # queries 0-1, and every answer is right.
        ("target 18.0%", 0.6, 0.8, 0.4, 1.0),
        # Target 25%: every validation query is local; on test the 0.5 margin escalates.
        ("target 25.0%", 1.0, 0.7, 0.8, 0.6),
        # Cut at the 40th percentile of test, between margins 3 and 4: test queries 0-2 and
        # validation queries 0-6 are local.
        ("test share 60%", 0.7, 0.7, 0.6, 0.8),
        ("teacher only", 0.0, 0.9, 0.0, 0.6),
        ("student only", 1.0, 0.7, 1.0, 0.6),
    ],
)
def test_local_share_and_cascade(
    gate_targets, gate, val_local, val_cascade, test_local, test_cascade
):
    row = compute_rows(gate_targets)[gate]

    assert row["validation"]["local_share"] == val_local
    assert row["validation"]["cascade_accuracy"] == val_cascade
    assert row["test"]["local_share"] == test_local
    assert row["test"]["cascade_accuracy"] == test_cascade


def test_models_alone_in_every_row(gate_targets):
    for row in compute_rows(gate_targets).values():
        assert row["validation"]["teacher_accuracy"] == 0.9
        assert row["validation"]["student_accuracy"] == 0.7
        assert row["test"]["teacher_accuracy"] == 0.6
        assert row["test"]["student_accuracy"] == 0.6


def test_logit_margin_rows(gate_targets):
    top1 = compute_rows(gate_targets)
    margin = compute_rows(gate_targets, score="logit_margin")
    row = margin["target 18.0%"]
    # The 18% target keeps the six most confident validation queries; the sixth has margin 5.
    expected = 1.0 / (1.0 + np.exp(-5.0 / row["temperature"]))

    assert row["score"] == "logit_margin"
    assert row["threshold"] == pytest.approx(expected, rel=1e-12)
    # One non-zero logit per row: both scores rank the queries alike.
    for gate in top1:
        assert margin[gate]["test"] == top1[gate]["test"]


def test_local_disagreement(gate_targets):
    rows = compute_rows(gate_targets)

    assert rows["target 0.0%"]["validation"]["local_disagreement"] == 0.0
    assert rows["target 18.0%"]["validation"]["local_disagreement"] == 1 / 6
    assert rows["target 25.0%"]["validation"]["local_disagreement"] == 0.2
    # On test the two models agree on query 4 only.
    assert rows["target 18.0%"]["test"]["local_disagreement"] == 1.0
    assert rows["student only"]["test"]["local_disagreement"] == 0.8
    assert rows["teacher only"]["test"]["local_disagreement"] == 0.0


def test_out_of_scope_figures(gate_targets):
    rows = compute_rows(gate_targets, oos_index=2)
    # At 25% the cascade predicts 0, 2, 1, 0, 0: in-scope queries 0 and 4 of 0, 3 and 4 are
    # right, and out-of-scope query 1 of 1 and 2.
    test = rows["target 25.0%"]["test"]

    assert test["in_scope_accuracy"] == 2 / 3
    assert test["oos_recall"] == 0.5


def test_oos_figures_none_without_queries(gate_targets):
    # Validation has no query with label 2.
    validation = compute_rows(gate_targets, oos_index=2)["target 18.0%"]["validation"]

    assert validation["in_scope_accuracy"] == 0.8
    assert validation["oos_recall"] is None


def test_no_oos_figures_without_label(gate_targets):
    test = compute_rows(gate_targets)["target 18.0%"]["test"]

    assert "in_scope_accuracy" not in test
    assert "oos_recall" not in test


def test_markdown_one_line_per_row(gate_targets):
    rows = list(compute_rows(gate_targets, oos_index=2).values())
    results = {
        "config": "c.toml",
        "command": "python benchmarks/gate_targets.py --config c.toml",
        "build_dir": "build/c",
        "tokenizers": {"student": "tokenizer.json"},
        "machine": {"machine": "x86_64", "cpu": "cpu", "python": "3.11", "onnxruntime": "1"},
        "seconds": 1.0,
        "finished_at": "2025-01-01T00:00:00+00:00",
        "oos_label": "oos",
        "sizes": {"labels": 3, "validation": 10, "test": 5},
        "config_target": 0.02,
        "build_score": "max_probability",
        "rows": rows,
    }
    lines = gate_targets.render_markdown(results).splitlines()

    table = [line for line in lines if line.startswith("| ") and "---" not in line]
    assert len(table) == 1 + len(rows)
    assert table[0].endswith("| test in-scope | test OOS recall |")
    assert table[3].startswith("| target 18.0% | ")
    assert table[3].endswith(
        "| 60.00 | 16.67 | 80.00 | 40.00 | 100.00 | 100.00 | 100.00 | 100.00 |"
    )


def test_missing_model_named(gate_targets, tmp_path):
    with pytest.raises(ConfigError, match=r"teacher-int8\.onnx not found .*--config c\.toml"):
        gate_targets.required_file(tmp_path, "teacher-int8.onnx", "c.toml")


@pytest.mark.parametrize("text", ["0.01,abc", "", "0.01,1.5"])
def test_invalid_targets_rejected(gate_targets, text):
    with pytest.raises(ConfigError, match="--targets"):
        gate_targets.parse_targets(text)
