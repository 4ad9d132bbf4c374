"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`), from the sdist of the installed version.

The sdist is downloaded once with pip into `$XDG_CACHE_HOME/capsnet_hf/transformers-tests/<version>` (default
`~/.cache/...`), and only the test files the mixins need are extracted there, as the package
`transformers_sdist_tests` so that their relative imports work. Nothing of it lives in this repository.

The sdist ships `tests/test_*.py` but not the subpackages `test_modeling_common.py` and
`test_configuration_common.py` import from; each missing one is replaced by a stand-in below (a file of the same
name in a later sdist is used instead).
"""

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import types
import warnings
from pathlib import Path

import pytest
import transformers

PACKAGE = "transformers_sdist_tests"
COMMON_TEST_FILES = ("test_modeling_common.py", "test_configuration_common.py")


class ExportTesterMixin:
    """Stand-in for `tests/exporters/test_export.py` (not in the sdist), the base of `ModelTesterMixin`. Its
    torch.export and ONNX tests are replaced by tests/test_export.py."""


class GenerationTesterMixin:
    """Stand-in for `tests/generation/test_utils.py` (not in the sdist). The mixin only checks that a tester of a
    model that cannot generate does not inherit it."""


# Stand-in for `tests/utils/test_configuration_utils.py` (not in the sdist): a value other than the default for
# every option PreTrainedConfig itself declares, which `ConfigTester.check_config_arguments_init` passes to the
# config and reads back.
CONFIG_COMMON_KWARGS = {
    "architectures": ["BertModel"],
    "output_hidden_states": True,
    "output_attentions": True,
    "return_dict": False,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}

STAND_INS = {
    "exporters.test_export": {"ExportTesterMixin": ExportTesterMixin},
    "generation.test_utils": {"GenerationTesterMixin": GenerationTesterMixin},
    "utils.test_configuration_utils": {"config_common_kwargs": CONFIG_COMMON_KWARGS},
}


def cache_folder(version: str = transformers.__version__) -> Path:
    """Where the test files of transformers `version` are extracted."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "capsnet_hf" / "transformers-tests" / version


def download_sdist(version: str, folder: Path) -> Path:
    """`pip download` the sdist of transformers `version` into `folder`; its path."""
    command = [sys.executable, "-m", "pip", "download", f"transformers=={version}"]
    command += ["--no-binary", ":all:", "--no-deps", "--quiet", "--dest", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    sdists = sorted(folder.glob(f"transformers-{version}.tar.gz"))
    if result.returncode != 0 or not sdists:
        raise RuntimeError(f"could not download the transformers {version} sdist: {result.stderr.strip()[-500:]}")
    return sdists[0]


def extract_test_files(sdist: Path, destination: Path) -> None:
    """The mixins' files from `sdist` into the package folder `destination`: the common test files and whatever
    of the stand-ins' modules it has."""
    wanted = [*COMMON_TEST_FILES, *(name.replace(".", "/") + ".py" for name in STAND_INS)]
    with tarfile.open(sdist) as archive:
        prefix = archive.getnames()[0].split("/")[0] + "/tests/"
        for name in wanted:
            try:
                member = archive.getmember(prefix + name)
            except KeyError:
                if name in COMMON_TEST_FILES:
                    raise RuntimeError(f"{sdist.name} has no tests/{name}") from None
                continue
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
    for folder in [destination, *(path for path in destination.rglob("*") if path.is_dir())]:
        (folder / "__init__.py").touch()


def common_tests_folder(version: str = transformers.__version__) -> Path:
    """The folder holding the package `transformers_sdist_tests` of `version`, downloaded and extracted once."""
    folder = cache_folder(version)
    if (folder / PACKAGE / COMMON_TEST_FILES[0]).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed into place: a concurrent or interrupted run never sees half a package.
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        build = Path(scratch) / "build"
        extract_test_files(download_sdist(version, Path(scratch)), build / PACKAGE)
        try:
            build.rename(folder)
        except OSError:  # another run renamed its copy into place first
            if not (folder / PACKAGE / COMMON_TEST_FILES[0]).is_file():
                raise
    return folder


def install_stand_ins(package_folder: Path) -> None:
    """Register, under the package's name, a module for each stand-in whose file the sdist did not have."""
    for name, attributes in STAND_INS.items():
        subpackage, module_name = name.split(".")
        if (package_folder / subpackage / f"{module_name}.py").is_file():
            continue
        if not (package_folder / subpackage).is_dir():  # an empty subpackage to hold the stand-in
            package = types.ModuleType(f"{PACKAGE}.{subpackage}")
            package.__path__ = []
            sys.modules.setdefault(package.__name__, package)
        module = types.ModuleType(f"{PACKAGE}.{name}", f"capsnet-hf's stand-in ({__name__}.py): not in the sdist")
        module.__dict__.update(attributes)
        sys.modules[module.__name__] = module


def import_common_tests() -> tuple[types.ModuleType, types.ModuleType]:
    """`test_modeling_common` and `test_configuration_common` of the installed transformers."""
    folder = common_tests_folder()
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    install_stand_ins(folder / PACKAGE)
    with warnings.catch_warnings():  # the marks transformers' own conftest.py registers (flash_attn_test, ...)
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        return (
            importlib.import_module(f"{PACKAGE}.test_modeling_common"),
            importlib.import_module(f"{PACKAGE}.test_configuration_common"),
        )
