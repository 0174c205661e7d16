"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`), taken at test time from the sdist of the
installed transformers release, never copied into this repository.

The sdist on the package registry ships `tests/test_modeling_common.py` and `tests/test_configuration_common.py`
unmodified, but not three modules they import: `tests/generation/test_utils.py` (`GenerationTesterMixin`),
`tests/exporters/test_export.py` (`ExportTesterMixin`) and `tests/utils/test_configuration_utils.py`
(`config_common_kwargs`). Those are written here as the smallest modules that let the two files import (two empty
mixins and a dict of common config fields), so that the export and generation tests of transformers' repository are
not run; `test_generation_common.py` covers, with tests of its own, what `GenerationTesterMixin` checks that needs no
logits.

The extracted files are cached under `build/transformers-<version>-tests-<stubs>/` (one folder per release, written
whole by a rename), so only the first run downloads (~10 MB, a few seconds).
"""

import hashlib
import importlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "upstream_transformers_tests"
# The files of the sdist's `tests/` folder that the harness imports.
SHIPPED = ("test_modeling_common.py", "test_configuration_common.py")
# The modules the sdist lacks, as the smallest text that lets the shipped files import.
MISSING = {
    "generation/test_utils.py": (
        '"""Not in the transformers sdist: an empty GenerationTesterMixin (no generate tests from upstream run)."""\n\n\n'
        "class GenerationTesterMixin:\n    pass\n"
    ),
    "exporters/test_export.py": (
        '"""Not in the transformers sdist: an empty ExportTesterMixin (no export tests from upstream run)."""\n\n\n'
        "class ExportTesterMixin:\n    pass\n"
    ),
    "utils/test_configuration_utils.py": (
        '"""Not in the transformers sdist: a non-default value for common `PreTrainedConfig` fields, which\n'
        '`ConfigTester.check_config_arguments_init` checks a config keeps."""\n\n'
        "config_common_kwargs = {\n"
        '    "return_dict": False,\n'
        '    "output_hidden_states": True,\n'
        '    "output_attentions": True,\n'
        '    "dtype": "float16",\n'
        '    "chunk_size_feed_forward": 5,\n'
        '    "architectures": ["BertModel"],\n'
        '    "id2label": {0: "label"},\n'
        '    "label2id": {"label": "0"},\n'
        '    "problem_type": "regression",\n'
        "}\n"
    ),
}


def cache_dir(version: str = transformers.__version__) -> Path:
    """One folder per transformers release and per text of the missing modules (a changed stub makes a new folder)."""
    stubs = hashlib.sha256(repr(sorted(MISSING.items())).encode()).hexdigest()[:8]
    return REPO_ROOT / "build" / f"transformers-{version}-tests-{stubs}"


def _download_sdist(version: str, into: Path) -> Path:
    """The sdist of transformers `version`, through pip (which follows the machine's index settings)."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
    done = subprocess.run(
        [*command, f"transformers=={version}", "--dest", str(into)], capture_output=True, text=True, check=False
    )
    archives = sorted(into.glob("transformers-*.tar.gz"))
    if done.returncode != 0 or not archives:
        raise RuntimeError(
            f"Could not download the sdist of transformers {version} (its tests/ folder holds the common model tests "
            f"this suite runs) with `{sys.executable} -m pip download`; it said:\n{done.stderr[-2000:]}\nThis needs "
            f"pip in the environment and the package registry reachable, or {cache_dir(version)} filled by an "
            "earlier run; a transformers installed from a git checkout has no sdist: install a release."
        )
    return archives[0]


def _build(version: str) -> Path:
    target = cache_dir(version)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        archive = _download_sdist(version, tmp / "sdist")
        package = tmp / "out" / PACKAGE
        package.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            for name in SHIPPED:
                member = tar.getmember(f"transformers-{version}/tests/{name}")
                (package / name).write_bytes(tar.extractfile(member).read())
        for relative, text in MISSING.items():
            path = package / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        for folder in {package, *((package / relative).parent for relative in MISSING)}:
            (folder / "__init__.py").touch()
        try:  # atomic: a concurrent or interrupted run never leaves a half-written folder
            os.rename(tmp / "out", target)
        except OSError:
            if not target.exists():
                raise
    return target


def package_dir() -> Path:
    """The folder of the installed release's test files, downloaded and extracted on first use."""
    version = transformers.__version__
    root = cache_dir(version)  # written whole or not at all (`_build` renames a finished folder into place)
    if not root.exists():
        root = _build(version)
    return root / PACKAGE


def markers() -> set[str]:
    """The pytest markers the shipped files use (`@mark.flash_attn_test`, ...): they differ between releases, and this
    suite runs with `--strict-markers`, so conftest.py declares them before the files are imported."""
    builtin = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}
    text = "".join((package_dir() / name).read_text() for name in SHIPPED)
    return set(re.findall(r"\bmark\.([A-Za-z_][A-Za-z0-9_]*)", text)) - builtin


def load(module: str):
    """`module` (`"test_modeling_common"` or `"test_configuration_common"`) of the installed transformers release."""
    root = str(package_dir().parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"{PACKAGE}.{module}")
