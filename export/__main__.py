"""Command line of the export pipeline: ``python -m export build --config FILE`` and
``python -m export trim-vocab --package FILE --out FILE``."""

from __future__ import annotations

import argparse
import logging
import sys

from edge_runtime.errors import EdgeRuntimeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="train, export, quantize and package")
    build_parser.add_argument("--config", required=True, help="TOML build config")
    build_parser.add_argument("--output-dir", help="override output.dir")
    build_parser.add_argument("--models-dir", help="override output.models_dir")
    build_parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, for example --set teacher.mode=onnx; the value is read "
        "as TOML, else as a string; repeat for several",
    )
    from export.vocab import add_arguments as add_trim_vocab_arguments

    trim_parser = commands.add_parser(
        "trim-vocab", help="keep only the tokens a corpus uses and write a new package version"
    )
    add_trim_vocab_arguments(trim_parser)
    args = parser.parse_args(argv)

    # onnxruntime's quantizer logs every tensor at INFO on the root logger, so only this
    # project's loggers run at INFO.
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in ("export", "edge_runtime"):
        logging.getLogger(name).setLevel(logging.INFO)
    if args.command == "trim-vocab":
        return _trim_vocab(args)
    from export.build import build
    from export.config import load_config, parse_override

    try:
        overrides = dict(parse_override(item) for item in args.overrides)
    except EdgeRuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output_dir:
        overrides["output.dir"] = args.output_dir
    if args.models_dir is not None:
        overrides["output.models_dir"] = args.models_dir
    try:
        config = load_config(args.config, overrides)
        report = build(config)
    except EdgeRuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    preview = report["stages"]["cascade_preview_test"]
    print(
        f"build finished in {report['seconds']} s: student package "
        f"{report['packages']['student']['path']}, test cascade accuracy "
        f"{preview['accuracy']:.4f} with {preview['local_fraction']:.1%} local"
    )
    return 0


def _trim_vocab(args: argparse.Namespace) -> int:
    from export.vocab import run_trim_vocab

    try:
        report = run_trim_vocab(args)
    except EdgeRuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    check = report["check"]
    print(
        f"wrote {report['output']['path']} (version {report['output']['version']}, "
        f"{report['tokens']['kept']} of {report['tokens']['original']} tokens, "
        f"{report['source']['package_bytes']} -> {report['output']['package_bytes']} bytes); "
        f"{check['changed']} of {check['texts']} test queries changed, max |logit diff| on the "
        f"others {check['logits_max_abs_diff_unchanged']}; report {report['report_path']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
