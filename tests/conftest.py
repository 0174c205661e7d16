"""Shared fixtures. The tests run offline, build their own tiny models, and read the official golden fixtures from
`../shared/fixtures/official-tiny` relative to the repository root."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Before transformers / huggingface_hub are imported: both read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
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
OFFICIAL_DIR = REPO_ROOT.parent / "shared" / "fixtures" / "official-tiny"

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
            f"Official CALM fixtures not found at {OFFICIAL_DIR}. The parity tests need the shared folder beside the "
            "repository (../shared/fixtures/official-tiny, as in CI).",
            pytrace=False,
        )
    return OFFICIAL_DIR


@pytest.fixture(scope="session")
def official_tensors(official_dir) -> dict[str, torch.Tensor]:
    return load_file(official_dir / "fixtures.safetensors")
