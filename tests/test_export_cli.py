"""``python -m export build --set KEY=VALUE``: overrides are parsed as TOML values and reach
the config check before any training."""

from __future__ import annotations

from export.__main__ import main
from export.config import parse_override


def test_value_read_as_toml():
    assert parse_override("student.epochs=4") == ("student.epochs", 4)
    assert parse_override("student.layers=[0, 5]") == ("student.layers", [0, 5])
    assert parse_override("student.trim_vocabulary=true") == ("student.trim_vocabulary", True)


def test_bare_word_kept_as_string():
    assert parse_override("teacher.mode=onnx") == ("teacher.mode", "onnx")


def test_missing_equals_sign_fails(capsys):
    code = main(["build", "--config", "export/configs/clinc150.toml", "--set", "student.epochs"])

    assert code == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_override_reaches_config_check(capsys):
    code = main(["build", "--config", "export/configs/clinc150.toml",
                 "--set", "student.embedding_rank=999"])

    assert code == 2
    assert "'student.embedding_rank' is 999" in capsys.readouterr().err
