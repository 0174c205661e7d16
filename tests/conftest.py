"""Shared fixtures. The tests run offline, build their own tiny models, and read the official golden fixtures from
`tests/fixtures/official-tiny` (a copy of the official code's outputs, shipped with the repository)."""

import atexit
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

# Before transformers / huggingface_hub are imported: both read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
# As pyproject's pytest `filterwarnings` does in this process: a FutureWarning (a library's deprecation addressed to
# its callers) is an error in the scripts that the tests run as child processes too (examples, converter, benchmarks,
# torchrun ranks).
os.environ["PYTHONWARNINGS"] = "error::FutureWarning"
# The models are tiny: extra threads only add synchronisation cost (hundreds of times slower on a busy machine).
os.environ["OMP_NUM_THREADS"] = "1"
_MODULES_CACHE = tempfile.mkdtemp(prefix="calm-tests-hf-modules-")
os.environ["HF_MODULES_CACHE"] = _MODULES_CACHE
atexit.register(shutil.rmtree, _MODULES_CACHE, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from transformers_calm import CalmAutoencoder, CalmAutoencoderConfig  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent
SRC_DIR = REPO_ROOT / "src"
# The example scripts are imported by name, as `python examples/x.py` makes them importable: one module object per
# script for the whole session (the Trainer pickles a script's TrainingArguments subclass by its module name).
sys.path.insert(0, str(REPO_ROOT / "examples"))
OFFICIAL_DIR = Path(__file__).resolve().parent / "fixtures" / "official-tiny"


class _DeprecationRecords(logging.Handler):
    """transformers reports some deprecations through its logger rather than `warnings` (5.24: "`past_key_values`/
    `cache_params` are deprecated. Use `cache` instead."); this collects them."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if "deprecat" in message.lower():
            self.messages.append(message)


@pytest.fixture(autouse=True)
def fail_on_logged_deprecations():
    """A deprecation that transformers logs during a test fails the test, as a deprecation warning does."""
    handler = _DeprecationRecords()
    logger = logging.getLogger("transformers")  # the library's root logger: every transformers module logs through it
    logger.addHandler(handler)
    yield
    logger.removeHandler(handler)
    if handler.messages:
        pytest.fail("transformers logged a deprecation: " + " | ".join(handler.messages), pytrace=False)


TINY = {"vocab_size": 97, "patch_size": 4, "latent_size": 8, "hidden_size": 32, "intermediate_size": 48}


@pytest.fixture
def tiny_config():
    """Factory: `tiny_config(**overrides)` -> a small `CalmAutoencoderConfig`."""

    def make(**overrides):
        return CalmAutoencoderConfig(**{**TINY, **overrides})

    return make


@pytest.fixture
def tiny_model(tiny_config):
    """Factory: `tiny_model(seed=0, **config_overrides)` -> a seeded `CalmAutoencoder` in eval mode."""

    def make(seed=0, **overrides):
        torch.manual_seed(seed)
        return CalmAutoencoder(tiny_config(**overrides)).eval()

    return make


@pytest.fixture
def make_ids():
    """Factory: `make_ids(batch, length, vocab_size=97, low=1, seed=0)` -> random token ids (no id below `low`)."""

    def make(batch, length, vocab_size=TINY["vocab_size"], low=1, seed=0):
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(low, vocab_size, (batch, length), generator=generator)

    return make


@pytest.fixture(scope="session")
def official_dir() -> Path:
    if not (OFFICIAL_DIR / "fixtures.safetensors").is_file():
        pytest.fail(
            f"Official CALM fixtures not found at {OFFICIAL_DIR}: they are part of the repository "
            "(tests/fixtures/official-tiny); restore them with git.",
            pytrace=False,
        )
    return OFFICIAL_DIR


@pytest.fixture(scope="session")
def official_tensors(official_dir) -> dict[str, torch.Tensor]:
    return load_file(official_dir / "fixtures.safetensors")


# Prepended to the child scripts of `run_without_package`: makes `import transformers_calm` fail in the child, as on a
# machine where the package is not installed, and checks that it does.
HIDE_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, os, sys

    class HideTransformersCalm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "transformers_calm":
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
            return None

    sys.meta_path.insert(0, HideTransformersCalm())
    # The editable install puts src/ on sys.path through a .pth file: drop every entry that holds the package.
    sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or os.getcwd(), "transformers_calm"))]
    try:
        import transformers_calm  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        sys.exit("transformers_calm is still importable in the child process")

    """
)


def _run_without_package(script: str, args, cwd, **env) -> None:
    """Run `script` (its arguments in `sys.argv[1:]`) in a child Python where transformers_calm cannot be imported,
    offline, with the extra environment variables `env`; fail the test with its output if it fails."""
    child_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    child_env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", **env)
    proc = subprocess.run(
        [sys.executable, "-c", HIDE_PACKAGE + script, *map(str, args)],
        cwd=cwd,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="session")
def run_without_package():
    """`run_without_package(script, args, cwd, **env)`: see `_run_without_package`."""
    return _run_without_package


def pytest_collectstart(collector):
    """Before test_transformers_common.py imports transformers' common tests: declare the pytest markers they carry
    (they differ between transformers releases; pyproject's `--strict-markers` refuses undeclared ones)."""
    path = getattr(collector, "path", None)
    if path is not None and path.name == "test_transformers_common.py":
        from upstream_transformers import markers

        try:
            names = markers()
        except RuntimeError:
            return  # the module's import fails with the reason: a collection error, and the rest of the suite runs
        for name in sorted(names):
            collector.config.addinivalue_line("markers", f"{name}: a marker of transformers' common model tests")
