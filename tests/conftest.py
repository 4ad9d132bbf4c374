"""Shared test set-up: offline Hub, small threads, paths to fixtures and the shared datasets."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True, scope="session")
def kernel_cache(tmp_path_factory):
    """The CPU routing kernel is built into a temporary cache, not the user's ~/.cache."""
    path = tmp_path_factory.mktemp("kernel-cache")
    previous = os.environ.get("CAPSNET_HF_KERNEL_CACHE")
    os.environ["CAPSNET_HF_KERNEL_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("CAPSNET_HF_KERNEL_CACHE")
    else:
        os.environ["CAPSNET_HF_KERNEL_CACHE"] = previous


@pytest.fixture
def no_compiler(tmp_path, monkeypatch):
    """No C++ compiler (CXX names a missing one) and an empty kernel cache: the CPU routing kernel cannot be built."""
    from capsnet_hf.kernels.cpu_routing import load_kernel_library

    monkeypatch.setenv("CAPSNET_HF_KERNEL_CACHE", str(tmp_path / "empty-kernel-cache"))
    monkeypatch.setenv("CXX", "no-such-compiler-for-capsnet")
    load_kernel_library.cache_clear()
    yield
    load_kernel_library.cache_clear()


@pytest.fixture
def mnist_fixture_images():
    """The three real MNIST test digits in tests/fixtures as (PIL image, label) pairs."""
    from PIL import Image

    return [(Image.open(FIXTURES / f"mnist_{label}.png"), label) for label in (7, 2, 1)]


def small_config(**overrides):
    """A CapsNet small enough for fast CPU tests: 1x16x16, 8/4 channels, 2 primary types on a 4x4 grid (I = 32)."""
    from capsnet_hf import CapsNetConfig

    values = dict(
        image_size=16,
        conv1_channels=8,
        conv1_kernel_size=5,
        primary_capsule_types=2,
        primary_capsule_dim=4,
        primary_kernel_size=5,
        primary_stride=2,
        capsule_dim=6,
        decoder_hidden_sizes=[16, 32],
        num_labels=4,
    )
    values.update(overrides)
    return CapsNetConfig(**values)


def run_without_capsnet_hf(script: str, *args: str, workdir: Path, timeout: int = 300) -> dict:
    """Run `script` in a fresh interpreter where `import capsnet_hf` fails, as for a user who has only transformers
    and `trust_remote_code=True`; fail the test on a non-zero exit; return the JSON object of its last output line."""
    guard = 'import sys\nsys.modules["capsnet_hf"] = None  # this process must never import the package\n'
    path = workdir / "run_without_capsnet_hf.py"
    path.write_text(guard + textwrap.dedent(script))
    env = {**os.environ, "HF_MODULES_CACHE": str(workdir / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, str(path), *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _reset_accelerate_state():
    import sys

    if "accelerate" not in sys.modules:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test builds its own Accelerator: accelerate keeps one state per process (Trainer leaves one too)."""
    _reset_accelerate_state()
    yield
    _reset_accelerate_state()


@pytest.fixture
def renamed_names(monkeypatch):
    """The base names that `os.replace` renames onto, in order, during the test."""
    names = []
    real_replace = os.replace

    def recording_replace(source, target):
        names.append(os.path.basename(target))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", recording_replace)
    return names
