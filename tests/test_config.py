"""Tests for export.config: reading TOML build configs and rejecting invalid ones.

Every rejection must be a ConfigError whose message names the offending key or section.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from edge_runtime.errors import ConfigError
from export.config import BuildConfig, load_config, parse_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "export" / "configs"
MINIMAL_TOML = '[data]\npath = "data/clinc150"\n'


def write_toml(folder: Path, text: str, name: str = "build.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def config_with(section: str, key: str, value) -> dict:
    """Return a raw config with a valid data.path and one extra setting."""
    raw: dict = {"data": {"path": "data/clinc150"}}
    raw.setdefault(section, {})[key] = value
    return raw


# The real configs


def test_clinc150_config_values():
    config = load_config(CONFIG_DIR / "clinc150.toml")

    assert config.seed == 0
    assert config.data.path == "../shared/data/clinc150"
    assert config.data.labels == ()
    assert config.data.max_train_per_label == 0
    assert config.teacher.mode == "finetune"
    assert config.teacher.epochs == 3
    assert config.student.layers == (0, 5)
    assert config.student.temperature == 2.0
    assert config.student.alpha == 1.0
    assert config.student.epochs == 5
    assert config.student.embedding_rank == 192
    assert config.student.intermediate_size == 512
    assert config.student.trim_vocabulary is True
    assert config.student.special_tokens is False
    assert config.student.augment_copies == 4
    assert config.student.transfer_file == "../shared/data/wiki_sentences/all_wiki_sents.txt"
    assert config.output.version == 4
    assert config.calibration.max_disagreement == 0.02
    assert config.calibration.score == "logit_margin"
    assert config.output.dir == "build/clinc150"
    assert config.output.models_dir == "models"


def test_clinc150_config_defaults():
    config = load_config(CONFIG_DIR / "clinc150.toml")

    assert config.quantization.weight_type == "qint8"
    assert config.quantization.per_channel is True
    assert config.checks.min_int8_agreement == 0.97
    assert config.teacher.max_length == 64


def test_tiny_config_values():
    config = load_config(CONFIG_DIR / "clinc150-tiny.toml")

    assert config.data.path == "../shared/data/clinc150"
    assert len(config.data.labels) == 8
    assert config.data.labels[0] == "oos"
    assert "book_flight" in config.data.labels
    assert config.data.max_train_per_label == 40
    assert config.data.max_eval_per_label == 20
    assert config.teacher.mode == "head"
    assert config.student.layers == (0,)
    assert config.student.epochs == 2
    assert config.output.name == "clinc150-tiny"
    assert config.output.version == 1
    assert config.output.models_dir == ""
    assert config.checks.min_int8_agreement == 0.9


def test_real_config_digests_differ():
    full = load_config(CONFIG_DIR / "clinc150.toml")
    tiny = load_config(CONFIG_DIR / "clinc150-tiny.toml")

    assert full.digest() != tiny.digest()


def test_digest_stable_across_loads():
    first = load_config(CONFIG_DIR / "clinc150.toml").digest()
    second = load_config(CONFIG_DIR / "clinc150.toml").digest()

    assert first == second
    assert len(first) == 64
    assert set(first) <= set("0123456789abcdef")


# Defaults and types


def test_minimal_config_defaults(tmp_path: Path):
    config = load_config(write_toml(tmp_path, MINIMAL_TOML))

    assert isinstance(config, BuildConfig)
    assert config.seed == 0
    assert config.data.path == "data/clinc150"
    assert config.data.train_split == "train"
    assert config.teacher.mode == "finetune"
    assert config.student.layers == (0, 5)
    assert config.output.version == 1


def test_to_dict_contains_sections():
    config = parse_config({"data": {"path": "data/clinc150"}})

    sections = config.to_dict()

    assert set(sections) == {
        "data", "teacher", "student", "calibration", "quantization", "checks", "package",
        "output", "seed",
    }
    assert sections["student"]["layers"] == (0, 5)


def test_integer_accepted_for_float():
    config = parse_config(config_with("student", "alpha", 1))

    assert config.student.alpha == 1.0
    assert type(config.student.alpha) is float


def test_list_becomes_tuple():
    config = parse_config(config_with("data", "labels", ["oos", "timer"]))

    assert config.data.labels == ("oos", "timer")


def test_digest_reflects_change():
    base = parse_config({"data": {"path": "data/clinc150"}})
    changed = parse_config(config_with("student", "epochs", 4))

    assert base.digest() != changed.digest()


# Unknown names and wrong types


def test_unknown_section_rejected():
    raw = {"data": {"path": "data/clinc150"}, "trainer": {"epochs": 3}}

    with pytest.raises(ConfigError) as excinfo:
        parse_config(raw)
    assert "'trainer'" in str(excinfo.value)
    assert "unknown section" in str(excinfo.value)


def test_unknown_key_rejected():
    with pytest.raises(ConfigError) as excinfo:
        parse_config(config_with("student", "depth", 4))
    assert "'depth'" in str(excinfo.value)
    assert "[student]" in str(excinfo.value)


def test_unknown_key_from_file(tmp_path: Path):
    path = write_toml(tmp_path, MINIMAL_TOML + "[teacher]\nlr = 0.1\n")

    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert "'lr'" in str(excinfo.value)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("student", "epochs", "3"),
        ("student", "epochs", True),
        ("student", "epochs", 3.0),
        ("student", "alpha", "0.5"),
        ("student", "alpha", True),
        ("student", "layers", 0),
        ("data", "labels", "oos"),
        ("quantization", "per_channel", 1),
        ("teacher", "mode", 1),
        ("output", "dir", 5),
    ],
)
def test_wrong_type_rejected(section: str, key: str, value):
    with pytest.raises(ConfigError) as excinfo:
        parse_config(config_with(section, key, value))
    assert f"'{section}.{key}'" in str(excinfo.value)


def test_wrong_type_from_file(tmp_path: Path):
    path = write_toml(tmp_path, MINIMAL_TOML + '[student]\nepochs = "3"\n')

    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert "'student.epochs'" in str(excinfo.value)
    assert "expected int" in str(excinfo.value)


@pytest.mark.parametrize("seed", ["1", True, 1.5])
def test_seed_wrong_type(seed):
    with pytest.raises(ConfigError, match="'seed' must be an integer"):
        parse_config({"data": {"path": "data/clinc150"}, "seed": seed})


def test_section_not_table(tmp_path: Path):
    path = write_toml(tmp_path, 'teacher = "head"\n' + MINIMAL_TOML)

    with pytest.raises(ConfigError, match=r"\[teacher\] must be a table"):
        load_config(path)


# Validation of values


def test_missing_data_path():
    with pytest.raises(ConfigError, match="'data.path'"):
        parse_config({"student": {"epochs": 2}})


def test_empty_data_path():
    with pytest.raises(ConfigError, match="'data.path'"):
        parse_config({"data": {"path": ""}})


def test_invalid_teacher_mode():
    with pytest.raises(ConfigError) as excinfo:
        parse_config(config_with("teacher", "mode", "distill"))
    assert "'teacher.mode'" in str(excinfo.value)
    assert "'distill'" in str(excinfo.value)


@pytest.mark.parametrize("layers", [[6], [-1], [], [0, 5, 9]])
def test_student_layers_out_of_range(layers: list):
    with pytest.raises(ConfigError, match="'student.layers'"):
        parse_config(config_with("student", "layers", layers))


def test_student_layers_bounds_accepted():
    config = parse_config(config_with("student", "layers", [5, 0, 3]))

    assert config.student.layers == (5, 0, 3)


@pytest.mark.parametrize("alpha", [-0.1, 1.1, math.nan])
def test_alpha_out_of_range(alpha: float):
    with pytest.raises(ConfigError, match="'student.alpha'"):
        parse_config(config_with("student", "alpha", alpha))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_bounds_accepted(alpha: float):
    assert parse_config(config_with("student", "alpha", alpha)).student.alpha == alpha


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("teacher", "epochs", 0),
        ("teacher", "batch_size", 0),
        ("student", "epochs", -1),
        ("student", "batch_size", 0),
        ("output", "version", 0),
        ("teacher", "max_length", 7),
        ("teacher", "max_length", 513),
        ("student", "temperature", 0.0),
        ("calibration", "max_disagreement", 0.0),
        ("calibration", "max_disagreement", 1.0),
        ("calibration", "score", "entropy"),
        ("quantization", "weight_type", "int4"),
        ("checks", "onnx_tolerance", 0.0),
        ("checks", "min_int8_agreement", 1.5),
    ],
)
def test_invalid_value_rejected(section: str, key: str, value):
    with pytest.raises(ConfigError) as excinfo:
        parse_config(config_with(section, key, value))
    assert f"'{section}.{key}'" in str(excinfo.value)


@pytest.mark.parametrize("max_length", [8, 512])
def test_max_length_bounds_accepted(max_length: int):
    config = parse_config(config_with("teacher", "max_length", max_length))

    assert config.teacher.max_length == max_length


@pytest.mark.parametrize(
    ("section", "key", "names"),
    [
        ("calibration", "score", "'max_probability' or 'logit_margin'"),
        ("quantization", "weight_type", "'qint8' or 'quint8'"),
    ],
)
def test_wrong_type_lists_choices(section: str, key: str, names: str):
    with pytest.raises(ConfigError) as excinfo:
        parse_config(config_with(section, key, 0.5))
    assert f"'{section}.{key}' is 0.5" in str(excinfo.value)
    assert f"expected a string, {names}" in str(excinfo.value)


def test_toml_nan_alpha_rejected(tmp_path: Path):
    path = write_toml(tmp_path, MINIMAL_TOML + "[student]\nalpha = nan\n")

    with pytest.raises(ConfigError, match="'student.alpha'"):
        load_config(path)


def test_error_names_source_file(tmp_path: Path):
    path = write_toml(tmp_path, MINIMAL_TOML + '[teacher]\nmode = "distill"\n')

    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert str(path) in str(excinfo.value)


def test_config_error_is_value_error():
    with pytest.raises(ValueError):
        parse_config({})


# Overrides


def test_override_replaces_file_value(tmp_path: Path):
    path = write_toml(tmp_path, MINIMAL_TOML + "[student]\nepochs = 3\n")

    config = load_config(path, {"student.epochs": 5})

    assert config.student.epochs == 5


def test_override_adds_missing_section(tmp_path: Path):
    path = write_toml(tmp_path, MINIMAL_TOML)

    config = load_config(path, {"quantization.per_channel": False, "output.dir": "build/x"})

    assert config.quantization.per_channel is False
    assert config.output.dir == "build/x"


def test_override_keeps_other_keys(tmp_path: Path):
    path = write_toml(tmp_path, MINIMAL_TOML + "[student]\nepochs = 3\nalpha = 0.25\n")

    config = load_config(path, {"student.epochs": 1})

    assert config.student.alpha == 0.25


def test_override_whole_section(tmp_path: Path):
    path = write_toml(tmp_path, MINIMAL_TOML)

    config = load_config(path, {"data": {"path": "elsewhere", "max_train_per_label": 5}})

    assert config.data.path == "elsewhere"
    assert config.data.max_train_per_label == 5


def test_override_seed(tmp_path: Path):
    config = load_config(write_toml(tmp_path, MINIMAL_TOML), {"seed": 42})

    assert config.seed == 42


def test_override_on_real_config():
    config = load_config(CONFIG_DIR / "clinc150.toml", {"output.models_dir": ""})

    assert config.output.models_dir == ""
    assert config.output.dir == "build/clinc150"


def test_override_unknown_key(tmp_path: Path):
    path = write_toml(tmp_path, MINIMAL_TOML)

    with pytest.raises(ConfigError, match="'depth'"):
        load_config(path, {"student.depth": 4})


def test_override_unknown_section(tmp_path: Path):
    path = write_toml(tmp_path, MINIMAL_TOML)

    with pytest.raises(ConfigError, match="'model'"):
        load_config(path, {"model.size": "small"})


def test_override_wrong_type(tmp_path: Path):
    path = write_toml(tmp_path, MINIMAL_TOML)

    with pytest.raises(ConfigError, match="'student.epochs'"):
        load_config(path, {"student.epochs": "5"})


def test_override_invalid_value(tmp_path: Path):
    path = write_toml(tmp_path, MINIMAL_TOML)

    with pytest.raises(ConfigError, match="'teacher.mode'"):
        load_config(path, {"teacher.mode": "distill"})


def test_override_into_scalar_seed(tmp_path: Path):
    path = write_toml(tmp_path, "seed = 0\n" + MINIMAL_TOML)

    with pytest.raises(ConfigError, match="seed"):
        load_config(path, {"seed.value": 1})


# Files that cannot be read


def test_invalid_toml(tmp_path: Path):
    path = write_toml(tmp_path, "[data\npath = 'x'\n")

    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert "invalid TOML" in str(excinfo.value)
    assert str(path) in str(excinfo.value)


def test_duplicate_toml_key(tmp_path: Path):
    path = write_toml(tmp_path, MINIMAL_TOML + 'path = "again"\n')

    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)


def test_missing_file(tmp_path: Path):
    missing = tmp_path / "absent.toml"

    with pytest.raises(ConfigError) as excinfo:
        load_config(missing)
    assert "config file not found" in str(excinfo.value)
    assert str(missing) in str(excinfo.value)


def test_non_utf8_file(tmp_path: Path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n" + MINIMAL_TOML.encode("ascii"))

    with pytest.raises(ConfigError):
        load_config(path)


def test_folder_path(tmp_path: Path):
    with pytest.raises(ConfigError):
        load_config(tmp_path)


# Element types inside lists


def test_student_layers_bool_rejected():
    with pytest.raises(ConfigError, match="'student.layers'"):
        parse_config(config_with("student", "layers", [True]))


def test_data_labels_integers_rejected():
    with pytest.raises(ConfigError, match="'data.labels'"):
        parse_config(config_with("data", "labels", [1, 2]))


# Escalation logs as extra training data, and the teacher package mode


def test_loop_config_values():
    config = load_config(CONFIG_DIR / "clinc150-loop.toml")

    assert config.data.path == "../shared/data/clinc150"
    assert config.data.max_train_per_label == 20
    assert config.data.val_skip_per_label == 0
    assert config.data.extra_train == ()
    assert config.teacher.mode == "package"
    assert config.teacher.package == "models/clinc150-teacher.edgepkg"
    assert config.teacher.package_signer_key == ""
    assert config.student.layers == (0, 5)
    assert config.student.head_learning_rate == 1e-3
    assert config.checks.min_int8_agreement == 0.95
    assert config.output.version == 1
    assert config.output.models_dir == ""


def test_new_keys_default_off():
    config = parse_config({"data": {"path": "data/clinc150"}})

    assert config.data.extra_train == ()
    assert config.data.extra_train_weight == 1.0
    assert config.data.val_skip_per_label == 0
    assert config.teacher.package == ""
    assert config.teacher.package_signer_key == ""


def test_extra_train_paths_from_file(tmp_path: Path):
    text = MINIMAL_TOML + 'extra_train = ["logs/device-1", "logs/device-2/escalations.sqlite3"]\n'
    text += "extra_train_weight = 2\n"

    config = load_config(write_toml(tmp_path, text))

    assert config.data.extra_train == ("logs/device-1", "logs/device-2/escalations.sqlite3")
    assert config.data.extra_train_weight == 2.0


def test_extra_train_override_on_real_config():
    config = load_config(
        CONFIG_DIR / "clinc150-loop.toml",
        {"data.extra_train": ["build/retraining-loop/escalations"], "output.version": 2},
    )

    assert config.data.extra_train == ("build/retraining-loop/escalations",)
    assert config.output.version == 2
    assert config.digest() != load_config(CONFIG_DIR / "clinc150-loop.toml").digest()


@pytest.mark.parametrize("value", ["logs/device-1", [1, 2], [True], {"path": "logs"}])
def test_extra_train_wrong_type(value):
    with pytest.raises(ConfigError) as excinfo:
        parse_config(config_with("data", "extra_train", value))
    assert "'data.extra_train'" in str(excinfo.value)
    assert "a list of strings" in str(excinfo.value)


def test_extra_train_empty_path_rejected():
    with pytest.raises(ConfigError, match=r"'data.extra_train'.*none empty"):
        parse_config(config_with("data", "extra_train", ["logs/a", " "]))


def test_extra_train_repeated_path_rejected():
    with pytest.raises(ConfigError, match=r"'data.extra_train'.*'logs/a'.*more than once"):
        parse_config(config_with("data", "extra_train", ["logs/a", "logs/b", "logs/a"]))


@pytest.mark.parametrize("weight", [0, -1.0, math.inf, math.nan])
def test_extra_train_weight_invalid(weight: float):
    with pytest.raises(ConfigError, match="'data.extra_train_weight'"):
        parse_config(config_with("data", "extra_train_weight", weight))


def test_val_skip_negative_rejected():
    with pytest.raises(ConfigError, match="'data.val_skip_per_label'"):
        parse_config(config_with("data", "val_skip_per_label", -1))


def test_package_mode_accepted():
    raw = {
        "data": {"path": "data/clinc150"},
        "teacher": {"mode": "package", "package": "models/clinc150-teacher.edgepkg"},
    }

    config = parse_config(raw)

    assert config.teacher.mode == "package"
    assert config.teacher.package == "models/clinc150-teacher.edgepkg"


def test_package_mode_needs_package():
    with pytest.raises(ConfigError) as excinfo:
        parse_config(config_with("teacher", "mode", "package"))
    assert "'teacher.package'" in str(excinfo.value)
    assert "teacher.mode is 'package'" in str(excinfo.value)


def test_package_mode_needs_signer_key():
    raw = {
        "data": {"path": "data/clinc150"},
        "teacher": {"mode": "package", "package": "models/clinc150-teacher.edgepkg"},
        "package": {"signer_key": ""},
    }

    with pytest.raises(ConfigError, match="'teacher.package_signer_key'"):
        parse_config(raw)


def test_package_mode_own_signer_key():
    raw = {
        "data": {"path": "data/clinc150"},
        "teacher": {
            "mode": "package",
            "package": "teacher.edgepkg",
            "package_signer_key": "keys/teacher-signer.pub.pem",
        },
        "package": {"signer_key": ""},
    }

    assert parse_config(raw).teacher.package_signer_key == "keys/teacher-signer.pub.pem"


@pytest.mark.parametrize("mode", ["finetune", "head"])
@pytest.mark.parametrize("key", ["package", "package_signer_key"])
def test_teacher_package_keys_need_package_mode(mode: str, key: str):
    raw = {"data": {"path": "data/clinc150"}, "teacher": {"mode": mode, key: "teacher.edgepkg"}}

    with pytest.raises(ConfigError) as excinfo:
        parse_config(raw)
    assert f"'teacher.{key}'" in str(excinfo.value)
    assert "teacher.mode = 'package'" in str(excinfo.value)


def test_student_head_learning_rate():
    default = parse_config({"data": {"path": "data/clinc150"}})
    chosen = parse_config(config_with("student", "head_learning_rate", 1e-3))

    assert default.student.head_learning_rate == 0.0
    assert chosen.student.head_learning_rate == 1e-3


def test_student_head_learning_rate_negative():
    with pytest.raises(ConfigError, match="'student.head_learning_rate'"):
        parse_config(config_with("student", "head_learning_rate", -1e-3))
