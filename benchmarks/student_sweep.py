"""Student sweep on CLINC150: depth, vocabulary trimming and int8 recipe against size, latency,
accuracy and the cascade, in one run on one machine.

    python benchmarks/student_sweep.py [--build-dir build/clinc150] [--work-dir build/sweep]
        [--students L1,L2,L3,L2-e192] [--lock-file /tmp/quiet.lock]
        [--results benchmarks/results/student_sweep]

Run it from the repository root after a default build (``make models`` or ``python -m export
build --config export/configs/clinc150.toml``), whose ``teacher-fp32.onnx``,
``teacher-int8.onnx`` and ``tokenizer.json`` it reads. Stages:

1. Students. The fine-tuned teacher is loaded back from ``teacher-fp32.onnx``
   (``export.onnx_import``); each student is cut from its layers (STUDENTS), its embedding
   table factorized if it has a rank, and distilled on the train split with SWEEP_RECIPE
   (3 epochs, T = 2, alpha 0.5) and the other ``[student]`` settings of ``--config``, then
   exported to fp32 ONNX and checked against PyTorch. A student of an earlier run in
   ``--work-dir`` is reused, and so is the build's own student when its report shows the
   same layers and recipe.
2. Vocabulary trimming: each fp32 student is also trimmed (``export.vocab``) to the tokens of
   the train and validation splits plus the coverage tokens.
3. Quantization: every fp32 model (trimmed or not) through every recipe in RECIPES.
4. Accuracy: every model answers the validation and test splits one query at a time, as on
   a device. The gate is calibrated on validation with the config's target against the int8
   teacher's labels, as ``export build`` does, and the cascade is measured on test.
5. Latency: 1 intra-op thread, 1,000 pre-tokenized test queries per model, in blocks taken in
   turn (as ``benchmarks/latency.py``), with the teacher fp32 and int8 in the same run. With
   ``--lock-file`` the file exists while this stage runs, so cooperating jobs can pause.

Writes ``<results>.json``, ``<results>.md`` and ``<results>.png`` (the front).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from edge_runtime.data import load_split  # noqa: E402
from edge_runtime.gate import softmax  # noqa: E402

# Students: the teacher layers (of 6) each keeps, and the rank of its word embedding table.
# Rank 0 is the full 384 columns. Rank r is a (vocabulary, r) table and an (r, 384)
# projection, initialised from the truncated SVD of the teacher's table. L2 is the default
# build's student.
STUDENTS = {
    "L1": {"layers": (0,), "embedding_rank": 0},
    "L2": {"layers": (0, 5), "embedding_rank": 0},
    "L3": {"layers": (0, 2, 5), "embedding_rank": 0},
    "L2-e192": {"layers": (0, 5), "embedding_rank": 192},
}
# int8 recipes. "dynamic": weights int8 at build time, activations quantized per run;
# "static": QDQ with activation ranges from calibration queries. Weights are symmetric int8
# (s8) or asymmetric uint8 (u8), one scale per tensor or per output channel. ONNX Runtime's
# tooling uses u8 weights for x86 AVX2, and s8 weights with u8 activations for AVX-512 VNNI
# and ARM64. reduce_range (7-bit weights) avoids saturation in VPMADDUBSW on AVX2 and
# AVX-512 CPUs without VNNI.
RECIPES = {
    "dyn-s8-channel": {
        "kind": "dynamic",
        "weights": "qint8",
        "per_channel": True,
        "reduce_range": False,
        "note": "default build; AVX-512 VNNI, ARM64",
    },
    "dyn-s8-tensor": {
        "kind": "dynamic",
        "weights": "qint8",
        "per_channel": False,
        "reduce_range": False,
        "note": "",
    },
    "dyn-u8-channel": {
        "kind": "dynamic",
        "weights": "quint8",
        "per_channel": True,
        "reduce_range": False,
        "note": "AVX2",
    },
    "dyn-u8-tensor": {
        "kind": "dynamic",
        "weights": "quint8",
        "per_channel": False,
        "reduce_range": False,
        "note": "",
    },
    "dyn-u8-channel-7bit": {
        "kind": "dynamic",
        "weights": "quint8",
        "per_channel": True,
        "reduce_range": True,
        "note": "AVX2/AVX-512 without VNNI",
    },
    "static-s8-channel": {
        "kind": "static",
        "weights": "qint8",
        "per_channel": True,
        "reduce_range": False,
        "note": "QDQ, 512 calibration queries",
    },
}
OP_TYPES = ["MatMul", "Gemm", "Gather"]
CALIBRATION_QUERIES = 512
LATENCY_QUERIES = 1000
LATENCY_WARMUP = 100
LATENCY_ROUNDS = 5
LOCAL_SHARE_GOAL = 0.85
# The distillation recipe of the swept students: the [student] recipe of the default build
# when the sweep was first run. Pinned, so that later changes to the default config (which
# now distils its own student differently) do not change the swept students.
SWEEP_RECIPE = {
    "epochs": 3,
    "alpha": 0.5,
    "temperature": 2.0,
    "embedding_rank": 0,
    "intermediate_size": 0,
    "trim_vocabulary": False,
    "transfer_file": "",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/student_sweep.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--build-dir",
        default="build/clinc150",
        help="default build whose teacher and tokenizer are read",
    )
    parser.add_argument(
        "--config",
        default="export/configs/clinc150.toml",
        help="build config: data, student recipe, calibration target",
    )
    parser.add_argument(
        "--work-dir",
        default="build/sweep",
        help="folder for students and quantized models (kept between runs)",
    )
    parser.add_argument(
        "--students", default=",".join(STUDENTS), help="students to sweep, comma-separated"
    )
    parser.add_argument(
        "--recipes", default=",".join(RECIPES), help="int8 recipes to run, comma-separated"
    )
    parser.add_argument(
        "--builds",
        default="",
        help="finished build folders, comma-separated, whose int8 student joins the sweep as "
        "built (for a student shaped by build keys the sweep has no recipe for)",
    )
    parser.add_argument("--lock-file", help="file that exists while latency is measured")
    parser.add_argument(
        "--results",
        default="benchmarks/results/student_sweep",
        help="path of the results without suffix; .json, .md, .png written",
    )
    args = parser.parse_args(argv)
    students = [name for name in args.students.split(",") if name]
    unknown = sorted(set(students) - set(STUDENTS))
    if unknown:
        parser.error(f"--students has {unknown}; choose from {', '.join(STUDENTS)}")
    recipes = [r for r in args.recipes.split(",") if r]
    unknown_recipes = sorted(set(recipes) - set(RECIPES))
    if unknown_recipes:
        parser.error(f"--recipes has {unknown_recipes}; choose from {', '.join(RECIPES)}")
    build_dir = Path(args.build_dir)
    for name in ("teacher-fp32.onnx", "teacher-int8.onnx", "tokenizer.json"):
        if not (build_dir / name).is_file():
            print(
                f"error: {build_dir / name} is missing; run `make models` (or python -m "
                "export build --config export/configs/clinc150.toml) first",
                file=sys.stderr,
            )
            return 2
    builds = [Path(b) for b in args.builds.split(",") if b]
    for build in builds:
        for name in ("student-int8.onnx", "build_report.json"):
            if not (build / name).is_file():
                print(f"error: --builds names {build}, which has no {name}; give the output "
                      "folder of a finished `python -m export build`", file=sys.stderr)
                return 2
    results = run_sweep(args, build_dir, students, recipes, builds)
    base = Path(args.results)
    base.parent.mkdir(parents=True, exist_ok=True)
    (base.parent / f"{base.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (base.parent / f"{base.name}.md").write_text(render_markdown(results))
    plot_front(results, base.parent / f"{base.name}.png")
    print(f"results in {base}.json, .md and .png", file=sys.stderr)
    return 0


def progress(message: str) -> None:
    print(f"[sweep {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_sweep(
    args: argparse.Namespace,
    build_dir: Path,
    students: list[str],
    recipes: list[str],
    builds: list[Path] = (),
) -> dict:
    from export.config import load_config

    started = time.perf_counter()
    config = load_config(args.config)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = config.data.path
    train = load_split(data, "train")
    val = load_split(data, "val")
    test = load_split(data, "test")
    labels = sorted({e.label for e in train})
    index = {label: i for i, label in enumerate(labels)}
    split_labels = {
        name: np.array([index[e.label] for e in split])
        for name, split in (("validation", val), ("test", test))
    }
    texts = {"validation": [e.text for e in val], "test": [e.text for e in test]}
    oos = index.get("oos")
    tokenizer_json = (build_dir / "tokenizer.json").read_text()
    seconds: dict[str, float] = {}

    stage = time.perf_counter()
    student_paths = train_students(config, build_dir, work, students, train, labels)
    seconds["students"] = round(time.perf_counter() - stage, 1)

    stage = time.perf_counter()
    trimmed_tokenizer, selection = trimmed_vocabulary(tokenizer_json, train, val)
    (work / "tokenizer-trimmed.json").write_text(trimmed_tokenizer)
    fp32_models = {}
    for student, path in student_paths.items():
        fp32_models[(student, False)] = path
        trimmed_path = path.with_name("student-fp32-trimmed.onnx")
        if not trimmed_path.is_file():
            from export.vocab import trim_model

            model_bytes, _ = trim_model(path.read_bytes(), selection.kept_ids)
            trimmed_path.write_bytes(model_bytes)
        fp32_models[(student, True)] = trimmed_path
    seconds["trimming"] = round(time.perf_counter() - stage, 1)

    stage = time.perf_counter()
    calibration_texts = [e.text for e in train[:: max(1, len(train) // CALIBRATION_QUERIES)]]
    calibration_texts = calibration_texts[:CALIBRATION_QUERIES]
    models: dict[str, dict] = {}
    for (student, trimmed), fp32_path in fp32_models.items():
        tokenizer_text = trimmed_tokenizer if trimmed else tokenizer_json
        base_name = f"{student}{'-trimmed' if trimmed else ''}"
        spec = {
            "student": student,
            "depth": len(STUDENTS[student]["layers"]),
            "embedding_rank": STUDENTS[student]["embedding_rank"],
            "trimmed": trimmed,
        }
        models[f"{base_name} fp32"] = {
            **spec,
            "recipe": "fp32",
            "path": fp32_path,
            "tokenizer": tokenizer_text,
        }
        for recipe in recipes:
            target = fp32_path.with_name(f"{fp32_path.stem.replace('fp32', 'int8')}-{recipe}.onnx")
            if not target.is_file():
                progress(f"quantizing {base_name} with {recipe}")
                quantize(fp32_path, target, RECIPES[recipe], tokenizer_text, calibration_texts)
            models[f"{base_name} {recipe}"] = {
                **spec,
                "recipe": recipe,
                "path": target,
                "tokenizer": tokenizer_text,
            }
    built_students = {}
    for build in builds:
        spec = built_student(build)
        built_students[build.name] = spec["settings"]
        models[f"{build.name} {spec['recipe']}"] = spec
    seconds["quantization"] = round(time.perf_counter() - stage, 1)

    stage = time.perf_counter()
    teachers = {
        "teacher fp32": {"path": build_dir / "teacher-fp32.onnx", "tokenizer": tokenizer_json},
        "teacher int8": {"path": build_dir / "teacher-int8.onnx", "tokenizer": tokenizer_json},
    }
    logits_cache = work / "logits"
    logits_cache.mkdir(exist_ok=True)
    all_logits = {}
    for name, model in {**teachers, **models}.items():
        all_logits[name] = single_query_logits(name, model, texts, logits_cache)
    teacher_val = all_logits["teacher int8"]["validation"].argmax(1)
    teacher_test = all_logits["teacher int8"]["test"].argmax(1)
    rows = []
    for name, model in {**teachers, **models}.items():
        figures = accuracy_figures(all_logits[name], split_labels, oos)
        if name in models:
            figures.update(
                cascade_figures(
                    all_logits[name],
                    split_labels,
                    teacher_val,
                    teacher_test,
                    config.calibration.max_disagreement,
                )
            )
        payload = model["path"].stat().st_size + len(model["tokenizer"].encode())
        rows.append(
            {
                "name": name,
                "kind": "teacher" if name in teachers else "student",
                "student": model.get("student", ""),
                "depth": model.get("depth", 6),
                "embedding_rank": model.get("embedding_rank", 0),
                "trimmed": model.get("trimmed", False),
                "recipe": model.get("recipe", name.split()[-1]),
                "model_bytes": model["path"].stat().st_size,
                "payload_bytes": payload,
                **figures,
            }
        )
    seconds["accuracy"] = round(time.perf_counter() - stage, 1)

    stage = time.perf_counter()
    latency = measure_latency({**teachers, **models}, texts["test"], args.lock_file)
    for row in rows:
        row.update(latency[row["name"]])
    seconds["latency"] = round(time.perf_counter() - stage, 1)
    seconds["total"] = round(time.perf_counter() - started, 1)

    teacher_fp32_ms = latency["teacher fp32"]["median_ms"]
    for row in rows:
        row["teacher_fp32_over_this"] = teacher_fp32_ms / row["median_ms"]
    mark_front(rows)
    return {
        "command": command_line(args),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "config": args.config,
        "build_dir": str(build_dir),
        "students": {
            name: {
                "layers": list(STUDENTS[name]["layers"]),
                "embedding_rank": STUDENTS[name]["embedding_rank"],
            }
            for name in students
        },
        "built_students": built_students,
        "recipes": {r: RECIPES[r] for r in recipes},
        "vocabulary": {
            "kept": int(selection.size),
            "original": int(selection.original_size),
            "from_corpus": int(selection.from_corpus),
            "for_coverage": int(selection.for_coverage),
        },
        "calibration_target": config.calibration.max_disagreement,
        "seconds": seconds,
        "rows": rows,
    }


def train_students(
    config, build_dir: Path, work: Path, students: list[str], train: list, labels: list[str]
) -> dict[str, Path]:
    """Return student name -> fp32 ONNX file, distilling those an earlier run did not leave."""
    paths = {name: work / name / "student-fp32.onnx" for name in students}
    built = build_dir / "student-fp32.onnx"
    recipe = dataclasses.replace(config.student, **SWEEP_RECIPE)
    for name in students:
        spec = STUDENTS[name]
        if (
            not paths[name].is_file()
            and built.is_file()
            and spec["embedding_rank"] == 0
            and _built_with_recipe(build_dir, spec["layers"], recipe)
        ):
            # The build distilled this student with the same recipe.
            progress(f"reusing the student of {build_dir} as {name}")
            paths[name].parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built, paths[name])
    todo = [name for name in students if not paths[name].is_file()]
    if not todo:
        return paths
    from export.modeling import (
        cut_student,
        factorize_word_embeddings,
        load_pretrained_classifier,
        load_tokenizer,
    )
    from export.onnx_export import check_export, export_onnx
    from export.onnx_import import load_onnx_weights
    from export.train import distil_student, predict_logits

    tokenizer = load_tokenizer(config.teacher.max_length)
    progress(f"loading the fine-tuned teacher from {build_dir / 'teacher-fp32.onnx'}")
    teacher = load_pretrained_classifier(len(labels))
    load_onnx_weights(teacher, build_dir / "teacher-fp32.onnx")
    teacher.eval()
    index = {label: i for i, label in enumerate(labels)}
    train_texts = [e.text for e in train]
    train_labels = np.array([index[e.label] for e in train], dtype=np.int64)
    soft_path = work / "soft-targets.npy"
    if soft_path.is_file():
        soft_targets = np.load(soft_path)
    else:
        soft_targets = predict_logits(teacher, tokenizer, train_texts, description="soft targets")
        np.save(soft_path, soft_targets)
    for name in todo:
        layers, rank = STUDENTS[name]["layers"], STUDENTS[name]["embedding_rank"]
        progress(
            f"distilling student {name} (teacher layers {list(layers)}, embedding rank "
            f"{rank or 'full'})"
        )
        student = cut_student(teacher, layers)
        if rank:
            kept = factorize_word_embeddings(student, rank)
            progress(f"rank {rank} keeps {kept:.1%} of the embedding table's squared norm")
        distil_student(
            student, tokenizer, train_texts, train_labels, soft_targets, recipe, config.seed
        )
        partial = paths[name].with_suffix(".partial.onnx")
        export_onnx(student, partial, train_texts, tokenizer)
        check_export(
            student,
            partial,
            tokenizer,
            train_texts[:256],
            config.checks.onnx_tolerance,
            f"student {name}",
        )
        os.replace(partial, paths[name])
        del student
    return paths


def built_student(build: Path) -> dict:
    """Return the int8 student of a finished build as a sweep model, with the build keys that
    shaped it."""
    report = json.loads((build / "build_report.json").read_text())
    student = report["stages"]["student"]
    quantization = report["config"]["quantization"]
    tokenizer = build / "student-tokenizer.json"
    if not tokenizer.is_file():
        tokenizer = build / "tokenizer.json"
    recipe = (f"build-{'s8' if quantization['weight_type'] == 'qint8' else 'u8'}-"
              f"{'channel' if quantization['per_channel'] else 'tensor'}")
    return {
        "student": build.name,
        "depth": len(student["layers"]),
        "embedding_rank": student.get("embedding_rank", 0),
        "trimmed": student.get("vocabulary") is not None,
        "recipe": recipe,
        "path": build / "student-int8.onnx",
        "tokenizer": tokenizer.read_text(),
        "settings": {
            "layers": student["layers"],
            "embedding_rank": student.get("embedding_rank", 0),
            "intermediate_size": student.get("intermediate_size", 0),
            "kept_tokens": (student.get("vocabulary") or {}).get("kept"),
            "transfer_sentences": student["examples"].get("transfer", 0),
            "epochs": report["config"]["student"]["epochs"],
        },
    }


def _built_with_recipe(build_dir: Path, layers: tuple, recipe) -> bool:
    """Return whether the build's student-fp32.onnx is the student the sweep would distil: the
    same layers and recipe, and no embedding factorization, feed-forward narrowing, trim or
    transfer."""
    report_path = build_dir / "build_report.json"
    if not report_path.is_file():
        return False
    built = json.loads(report_path.read_text())["config"]["student"]
    expected = {**dataclasses.asdict(recipe), "layers": list(layers)}
    plain = {"embedding_rank": 0, "intermediate_size": 0, "trim_vocabulary": False,
             "transfer_file": ""}
    return all(built.get(key, plain.get(key)) == value
               for key, value in {**expected, **plain}.items())


def trimmed_vocabulary(tokenizer_json: str, train: list, val: list):
    from export.vocab import check_tokenizer_remap, select_vocabulary, trim_tokenizer

    selection = select_vocabulary(tokenizer_json, [e.text for e in train + val])
    trimmed = trim_tokenizer(tokenizer_json, selection.kept_ids)
    check_tokenizer_remap(tokenizer_json, trimmed, selection.kept_ids)
    return trimmed, selection


def _tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tokenizer.enable_truncation(64)
    return tokenizer


def _feed(tokenizer, text: str) -> dict[str, np.ndarray]:
    encoding = tokenizer.encode(text)
    return {
        "input_ids": np.asarray([encoding.ids], dtype=np.int64),  # (1, seq)
        "attention_mask": np.asarray([encoding.attention_mask], dtype=np.int64),
    }


def quantize(
    source: Path, target: Path, recipe: dict, tokenizer_json: str, calibration_texts: list[str]
) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    weight_type = QuantType.QInt8 if recipe["weights"] == "qint8" else QuantType.QUInt8
    scratch = target.with_name(target.stem + ".scratch")
    scratch.mkdir(exist_ok=True)
    try:
        output = scratch / "model.onnx"
        if recipe["kind"] == "dynamic":
            quantize_dynamic(
                str(source),
                str(output),
                op_types_to_quantize=OP_TYPES,
                per_channel=recipe["per_channel"],
                reduce_range=recipe["reduce_range"],
                weight_type=weight_type,
            )
        else:
            tokenizer = _tokenizer(tokenizer_json)

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self._feeds = iter([_feed(tokenizer, t) for t in calibration_texts])

                def get_next(self):
                    return next(self._feeds, None)

            quantize_static(
                str(source),
                str(output),
                Reader(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=OP_TYPES,
                per_channel=recipe["per_channel"],
                reduce_range=recipe["reduce_range"],
                activation_type=QuantType.QUInt8,
                weight_type=weight_type,
            )
        os.replace(output, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def single_query_logits(
    name: str, model: dict, texts: dict[str, list[str]], cache: Path
) -> dict[str, np.ndarray]:
    """Logits of every validation and test query, one query per run as on a device; cached
    by the model file's size and modification time."""
    stat = model["path"].stat()
    key = f"{name.replace(' ', '_')}-{stat.st_size}-{int(stat.st_mtime)}.npz"
    cached = cache / key
    if cached.is_file():
        stored = np.load(cached)
        return {split: stored[split] for split in texts}
    progress(f"answering {sum(len(t) for t in texts.values())} queries with {name}")
    session = _session(model["path"], threads=2)
    tokenizer = _tokenizer(model["tokenizer"])
    out = {}
    for split, split_texts in texts.items():
        out[split] = np.concatenate(
            [session.run(["logits"], _feed(tokenizer, t))[0] for t in split_texts]
        )
    np.savez(cached, **out)
    return out


def accuracy_figures(
    logits: dict[str, np.ndarray], labels: dict[str, np.ndarray], oos: int | None
) -> dict:
    predictions = logits["test"].argmax(1)
    expected = labels["test"]
    figures = {"accuracy": float((predictions == expected).mean())}
    if oos is not None:
        in_scope = expected != oos
        figures["in_scope_accuracy"] = float((predictions[in_scope] == expected[in_scope]).mean())
        figures["oos_recall"] = float((predictions[~in_scope] == oos).mean())
    return figures


def cascade_figures(
    logits: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    teacher_val: np.ndarray,
    teacher_test: np.ndarray,
    max_disagreement: float,
) -> dict:
    """The build's gate (temperature and threshold fitted on validation), applied to test, and
    the cascade at the threshold that answers LOCAL_SHARE_GOAL of test locally."""
    from export.calibrate import calibrate

    calibration = calibrate(
        logits["validation"], labels["validation"], teacher_val, max_disagreement
    )
    confidence = softmax(logits["test"], calibration.temperature).max(axis=1)
    student = logits["test"].argmax(1)
    expected = labels["test"]
    local = confidence >= calibration.threshold
    cascade = np.where(local, student, teacher_test)
    # The lowest threshold that still escalates (1 - goal) of test: a point of the curve, fitted
    # on test, to compare students; the gate above is the one a package ships.
    cut = np.quantile(confidence, 1.0 - LOCAL_SHARE_GOAL)
    local_goal = confidence >= cut
    cascade_goal = np.where(local_goal, student, teacher_test)
    return {
        "gate_threshold": calibration.threshold,
        "gate_temperature": calibration.temperature,
        "cascade_accuracy": float((cascade == expected).mean()),
        "local_share": float(local.mean()),
        "cascade_accuracy_at_goal": float((cascade_goal == expected).mean()),
        "local_share_at_goal": float(local_goal.mean()),
        "teacher_agreement": float((student == teacher_test).mean()),
    }


def measure_latency(models: dict[str, dict], texts: list[str], lock_file: str | None) -> dict:
    rng = np.random.default_rng(0)
    picked = [texts[i] for i in rng.choice(len(texts), size=LATENCY_QUERIES + LATENCY_WARMUP)]
    lock = Path(lock_file) if lock_file else None
    if lock is not None:
        lock.write_text(f"student sweep latency stage, pid {os.getpid()}\n")
    try:
        if lock is not None:
            progress(f"latency stage: {lock} exists; waiting 60 s for other jobs to pause")
            time.sleep(60)
        progress(f"latency of {len(models)} models, {LATENCY_QUERIES} queries each")
        sessions = {}
        feeds = {}
        for name, model in models.items():
            sessions[name] = _session(model["path"], threads=1)
            tokenizer = _tokenizer(model["tokenizer"])
            feeds[name] = [_feed(tokenizer, t) for t in picked]
        timings: dict[str, list[float]] = {name: [] for name in models}
        block = LATENCY_QUERIES // LATENCY_ROUNDS
        warmup = LATENCY_WARMUP // LATENCY_ROUNDS
        for first in range(0, LATENCY_QUERIES, block):
            for name, session in sessions.items():
                for feed in feeds[name][LATENCY_QUERIES : LATENCY_QUERIES + warmup]:
                    session.run(["logits"], feed)
                for feed in feeds[name][first : first + block]:
                    begin = time.perf_counter()
                    session.run(["logits"], feed)
                    timings[name].append((time.perf_counter() - begin) * 1000.0)
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)
    return {
        name: {"median_ms": float(np.median(values)), "p95_ms": float(np.percentile(values, 95))}
        for name, values in timings.items()
    }


def mark_front(rows: list[dict]) -> None:
    """Mark the students no other student beats on accuracy, latency and size at once."""
    students = [r for r in rows if r["kind"] == "student"]
    for row in students:
        row["on_front"] = not any(
            other is not row
            and other["accuracy"] >= row["accuracy"]
            and other["median_ms"] <= row["median_ms"]
            and other["payload_bytes"] <= row["payload_bytes"]
            and (other["accuracy"], -other["median_ms"], -other["payload_bytes"])
            != (row["accuracy"], -row["median_ms"], -row["payload_bytes"])
            for other in students
        )


def command_line(args: argparse.Namespace) -> str:
    command = "python benchmarks/student_sweep.py"
    defaults = {
        "build_dir": "build/clinc150",
        "config": "export/configs/clinc150.toml",
        "work_dir": "build/sweep",
        "students": ",".join(STUDENTS),
        "recipes": ",".join(RECIPES),
        "builds": "",
        "lock_file": None,
        "results": "benchmarks/results/student_sweep",
    }
    for key, default in defaults.items():
        value = getattr(args, key)
        if value != default:
            command += f" --{key.replace('_', '-')} {value}"
    return command


def machine_description() -> dict:
    import onnxruntime

    from edge_runtime.bench import this_cpu

    cpu = this_cpu()
    present = cpu["isa_flags"] or {}
    return {
        "cpu": cpu["cpu_model"],
        "isa": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if present.get(f)],
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value * 100:.2f}"


def render_markdown(results: dict) -> str:
    machine, seconds = results["machine"], results["seconds"]
    vocabulary = results["vocabulary"]
    teacher = {r["name"]: r for r in results["rows"] if r["kind"] == "teacher"}
    lines = [
        "# Student sweep on CLINC150",
        "",
        f"Command: `{results['command']}`. Machine: {machine['cores']} vCPU {machine['machine']} "
        f"({machine['cpu']}, {', '.join(machine['isa']) or 'no AVX2'}), Python "
        f"{machine['python']}, onnxruntime {machine['onnxruntime']}. {seconds['total'] / 60:.1f} "
        f"minutes (students {seconds['students']:.0f} s, quantization "
        f"{seconds['quantization']:.0f} s, accuracy {seconds['accuracy']:.0f} s, latency "
        f"{seconds['latency']:.0f} s). Finished {results['finished_at']}.",
        "",
        "Students (teacher layers kept, embedding rank; 0 is the full 384): "
        + ", ".join(
            f"{name} {spec['layers']} {spec['embedding_rank']}"
            for name, spec in results["students"].items()
        )
        + f"; distilled for {SWEEP_RECIPE['epochs']} epochs at T = "
        f"{SWEEP_RECIPE['temperature']:g}, alpha {SWEEP_RECIPE['alpha']:g}, with the other "
        f"settings of `{results['config']}`. Trimmed: {vocabulary['kept']:,} of "
        f"{vocabulary['original']:,} tokens ({vocabulary['from_corpus']:,} from the train and "
        "validation splits, "
        f"{vocabulary['for_coverage']:,} more so that any text tokenizes). Gate: fitted on "
        f"validation with the build's target (at most {results['calibration_target']:.1%} of "
        "local answers disagree with the int8 teacher), cascade on test with the int8 teacher. "
        f"`at {LOCAL_SHARE_GOAL:.0%}`: the cascade when the {LOCAL_SHARE_GOAL:.0%} most "
        "confident test queries are answered locally (a point of the curve, fitted on test). "
        "Payload: model plus tokenizer bytes, about what a package holds. Latency: 1 thread, "
        "median and p95 of 1,000 test queries. `x`: teacher fp32 median over this median. "
        "`front`: no other student is at least as accurate, fast and small.",
        "",
    ]
    for name, settings in results.get("built_students", {}).items():
        lines[-2] += (
            f" `{name}`: the int8 student of the build in that folder (layers "
            f"{settings['layers']}, embedding rank {settings['embedding_rank']}, feed-forward "
            f"width {settings['intermediate_size'] or 1536}, "
            f"{settings['kept_tokens'] or 30522:,} tokens, "
            f"{settings['transfer_sentences']:,} transfer sentences, {settings['epochs']} epochs)."
        )
    lines += [
        "| model | recipe | payload MB | median ms | p95 ms | x | accuracy | in-scope | "
        "OOS recall | local share | cascade | cascade at 85% | front |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['name'].rsplit(' ', 1)[0]} | {row['recipe']} | "
            f"{row['payload_bytes'] / 1e6:.2f} | {row['median_ms']:.3f} | {row['p95_ms']:.3f} | "
            f"{row['teacher_fp32_over_this']:.1f} | {_pct(row['accuracy'])} | "
            f"{_pct(row.get('in_scope_accuracy'))} | {_pct(row.get('oos_recall'))} | "
            f"{_pct(row.get('local_share'))} | {_pct(row.get('cascade_accuracy'))} | "
            f"{_pct(row.get('cascade_accuracy_at_goal'))} | "
            f"{'yes' if row.get('on_front') else ''} |"
        )
    lines += [
        "",
        f"Teacher alone on test: fp32 {_pct(teacher['teacher fp32']['accuracy'])}%, int8 "
        f"{_pct(teacher['teacher int8']['accuracy'])}% (the cascade's teacher).",
        "",
        "Recipes: "
        + "; ".join(
            f"`{name}` {recipe['kind']}, {recipe['weights']} weights, "
            f"{'per channel' if recipe['per_channel'] else 'per tensor'}"
            f"{', 7-bit' if recipe['reduce_range'] else ''}"
            f"{' (' + recipe['note'] + ')' if recipe['note'] else ''}"
            for name, recipe in results["recipes"].items()
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def plot_front(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["kind"] == "student"]
    figure, axis = plt.subplots(figsize=(8, 5.5))
    colours = {1: "tab:orange", 2: "tab:blue", 3: "tab:green"}
    for row in rows:
        axis.scatter(
            row["median_ms"],
            row["accuracy"] * 100,
            s=row["payload_bytes"] / 1e6 * 12,
            color=colours.get(row["depth"], "grey"),
            alpha=0.9 if row["on_front"] else 0.35,
            marker="o" if row["trimmed"] else "s",
            edgecolors="black" if row["on_front"] else "none",
        )
    for depth, colour in colours.items():
        axis.scatter([], [], color=colour, label=f"{depth} layer{'s' if depth > 1 else ''}")
    axis.scatter([], [], color="grey", marker="o", label="trimmed vocabulary")
    axis.scatter([], [], color="grey", marker="s", label="full vocabulary")
    for row in results["rows"]:
        if row["kind"] == "teacher":
            axis.axhline(row["accuracy"] * 100, color="grey", linestyle=":", linewidth=1)
            axis.annotate(
                row["name"],
                (axis.get_xlim()[1], row["accuracy"] * 100),
                fontsize=8,
                ha="right",
                va="bottom",
                color="grey",
            )
    axis.set_xlabel("median single-query latency, ms (1 thread)")
    axis.set_ylabel("test accuracy, student alone (%)")
    axis.set_title("Student sweep on CLINC150: marker area = payload size; outlined = front")
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
