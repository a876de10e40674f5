"""The retraining loop's data layout (benchmarks/retraining_loop.py, stage 0): calibration
queries come from the end of each intent's train queries and never reach training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from edge_runtime.errors import ConfigError

LOOP_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "retraining_loop.py"


@pytest.fixture(scope="module")
def loop():
    spec = importlib.util.spec_from_file_location("retraining_loop", LOOP_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_source(folder: Path, per_intent: int) -> Path:
    data = {
        "train": [[f"{intent} train {i}", intent] for intent in ("alarm", "weather")
                  for i in range(per_intent)],
        "val": [["alarm val 0", "alarm"]],
        "test": [["weather test 0", "weather"]],
        "oos_train": [[f"oos train {i}", "oos"] for i in range(per_intent)],
        "oos_val": [["oos val 0", "oos"]],
        "oos_test": [["oos test 0", "oos"]],
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data_full.json").write_text(json.dumps(data))
    return folder


def test_calibration_is_the_end_of_train(loop, tmp_path):
    source = write_source(tmp_path / "source", per_intent=6)

    counts = loop.write_loop_data(str(source), tmp_path / "layout", 3, 2)

    layout = json.loads((tmp_path / "layout" / "data_full.json").read_text())
    assert layout["val"] == [["alarm train 4", "alarm"], ["alarm train 5", "alarm"],
                             ["weather train 4", "weather"], ["weather train 5", "weather"]]
    assert layout["oos_val"] == [["oos train 4", "oos"], ["oos train 5", "oos"]]
    assert counts["calibration_queries"] == 6


def test_training_part_keeps_the_front(loop, tmp_path):
    source = write_source(tmp_path / "source", per_intent=6)

    loop.write_loop_data(str(source), tmp_path / "layout", 3, 2)

    layout = json.loads((tmp_path / "layout" / "data_full.json").read_text())
    calibration = {text for text, _ in layout["val"] + layout["oos_val"]}
    first_three = [text for text, intent in layout["train"] if intent == "alarm"][:3]
    assert first_three == ["alarm train 0", "alarm train 1", "alarm train 2"]
    assert calibration.isdisjoint(text for text, _ in layout["train"] + layout["oos_train"])
    assert layout["test"] == [["weather test 0", "weather"]]
    assert layout["oos_test"] == [["oos test 0", "oos"]]


def test_too_few_train_queries_are_refused(loop, tmp_path):
    source = write_source(tmp_path / "source", per_intent=4)

    with pytest.raises(ConfigError, match="has 4 train queries; the loop needs 3 to train plus 2"):
        loop.write_loop_data(str(source), tmp_path / "layout", 3, 2)


def test_zero_calibration_queries_are_refused(loop, tmp_path):
    source = write_source(tmp_path / "source", per_intent=6)

    with pytest.raises(ConfigError, match="--calibration-per-label is 0"):
        loop.write_loop_data(str(source), tmp_path / "layout", 3, 0)
