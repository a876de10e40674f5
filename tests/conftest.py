"""Shared fixtures: the real data folder, a tiny CLINC150 build and gateways on loopback."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data"
CLINC150_DIR = DATA_DIR / "clinc150"
TINY_CONFIG = ROOT / "export" / "configs" / "clinc150-tiny.toml"
MODELS_DIR = ROOT / "models"
KEYS_DIR = MODELS_DIR / "keys"
SIGNER_PUBLIC = KEYS_DIR / "demo-signer.pub.pem"
SIGNER_PRIVATE = KEYS_DIR / "demo-signer.key.pem"
DEVICE_PUBLIC = KEYS_DIR / "demo-device.pub.pem"
DEVICE_PRIVATE = KEYS_DIR / "demo-device.key.pem"


def demo_trust(**kwargs):
    """A trust policy with the committed demo keys and no rollback state."""
    from edge_runtime import encryption, signing
    from edge_runtime.package import TrustPolicy

    return TrustPolicy(
        trusted_keys=(signing.load_public_key_pem(SIGNER_PUBLIC.read_bytes()),),
        device_key=encryption.load_private_key(DEVICE_PRIVATE),
        **kwargs,
    )


# Command-line options that make the CLI use the demo keys and leave the user's state alone.
CLI_TRUST = ["--signer-key", str(SIGNER_PUBLIC), "--device-key", str(DEVICE_PRIVATE),
             "--state-file", ""]


@dataclass(frozen=True)
class TinyBuild:
    dir: Path
    report: dict
    student_package: Path
    teacher_package: Path


def require_clinc150() -> None:
    if not (CLINC150_DIR / "data_full.json").is_file():
        pytest.skip(f"CLINC150 not found at {CLINC150_DIR}; the shared data folder must sit "
                    "beside the repository")


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory: pytest.TempPathFactory) -> TinyBuild:
    """The tiny CLINC150 build (8 labels, a few hundred queries), run once per test session."""
    require_clinc150()
    pytest.importorskip("torch")
    from export.build import build
    from export.config import load_config

    out = tmp_path_factory.mktemp("tiny-build")
    config = load_config(TINY_CONFIG, {
        "data.path": str(CLINC150_DIR), "output.dir": str(out), "output.models_dir": "",
        "package.signer_key": str(SIGNER_PRIVATE), "package.recipients": [str(DEVICE_PUBLIC)],
    })
    report = build(config)
    return TinyBuild(
        dir=out,
        report=report,
        student_package=out / "clinc150-tiny-student.edgepkg",
        teacher_package=out / "clinc150-tiny-teacher.edgepkg",
    )


@pytest.fixture(scope="session")
def tiny_gateway(tiny_build: TinyBuild):
    """A gateway child process serving the tiny teacher on a free loopback port."""
    from edge_runtime.gateway.server import running_gateway

    with running_gateway(tiny_build.teacher_package, signer_keys=(str(SIGNER_PUBLIC),)) as gateway:
        yield gateway
