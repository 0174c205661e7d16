"""Sharded training (`transformers_calm.fsdp`, FSDP2): the wrap units, the accelerate config files, and a 2-process
FSDP run on CPU (torchrun, gloo) whose losses and final weights equal those of one process on the same global batch."""

import json
import os
import subprocess
import sys

import factories
import fsdp_worker
import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file

from transformers_calm import CalmForCausalLM
from transformers_calm.fsdp import fsdp_layer_class_names, fsdp_wrap_modules

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATE_CONFIGS = os.path.join(REPO_ROOT, "examples", "accelerate")


@pytest.mark.parametrize(
    ("backbone_type", "head_type", "expected"),
    [
        ("llama", "energy", ["LlamaDecoderLayer", "CalmEnergyHeadBlock"]),
        ("qwen3", "energy", ["Qwen3DecoderLayer", "CalmEnergyHeadBlock"]),
        ("llama", "flow", ["LlamaDecoderLayer", "CalmAdaLNBlock"]),
        ("llama", "diffusion", ["LlamaDecoderLayer", "CalmAdaLNBlock"]),
    ],
)
def test_wrap_units_are_the_decoder_layers_and_head_blocks(backbone_type, head_type, expected):
    model = factories.tiny_calm(0, backbone_type=backbone_type, random_head=False, head_type=head_type)
    assert fsdp_layer_class_names(model) == expected
    units = fsdp_wrap_modules(model)
    backbone = model.config.backbone_config
    assert len(units) == backbone.num_hidden_layers + model.config.num_mlp_layers
    inside_autoencoder = set(model.autoencoder.modules())
    assert not any(unit in inside_autoencoder for unit in units)
    covered = {id(p) for unit in units for p in unit.parameters()}
    assert {id(p) for p in model.model.backbone.layers.parameters()} <= covered


def test_accelerate_config_files():
    """ddp.yaml and fsdp.yaml load as accelerate configs; fsdp.yaml's wrap classes and ignored modules resolve, through
    accelerate's own FSDP2 functions, to exactly the units of `fsdp_wrap_modules` and the autoencoder's parameters."""
    ddp = load_config_from_file(os.path.join(ACCELERATE_CONFIGS, "ddp.yaml"))
    assert ddp.distributed_type == "MULTI_GPU" and ddp.mixed_precision == "bf16"
    fsdp = load_config_from_file(os.path.join(ACCELERATE_CONFIGS, "fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.mixed_precision == "bf16"
    options = fsdp.fsdp_config
    assert options["fsdp_version"] == 2 and options["fsdp_state_dict_type"] == "FULL_STATE_DICT"

    fsdp_utils = pytest.importorskip("accelerate.utils.fsdp_utils")
    if not hasattr(fsdp_utils, "get_parameters_from_modules"):
        pytest.skip("accelerate < 1.11: its FSDP2 path ignores fsdp_ignored_modules (fsdp.yaml needs 1.11)")
    from accelerate.utils import FullyShardedDataParallelPlugin

    model = factories.tiny_calm(0)
    classes = options["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert classes == fsdp_layer_class_names(model)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=classes,
        ignored_modules=options["fsdp_ignored_modules"],
    )
    policy = fsdp_utils.fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert [m for m in model.modules() if policy(m)] == fsdp_wrap_modules(model)
    ignored = fsdp_utils.get_parameters_from_modules(plugin.ignored_modules, model, torch.device("cpu"))
    assert {id(p) for p in ignored} == {id(p) for p in model.autoencoder.parameters()}


@pytest.mark.slow  # torchrun, 2 processes
def test_fsdp_on_two_processes_equals_one_process(tmp_path):
    """tests/fsdp_worker.py under torchrun (gloo): FSDP2 over 2 processes, 2 blocks each, against one process that
    computes the same two slices with the same seeds and steps on their mean loss. Equal losses within 1e-5 at every
    step, and the saved whole model (loaded with from_pretrained) equals the one-process model within 1e-5. Then the
    same run with bf16 parameters."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(REPO_ROOT, "tests", "fsdp_worker.py"), str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads((tmp_path / f"losses_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(record["world_size"] == 2 for record in records)

    model = fsdp_worker.make_model()
    optimizer = fsdp_worker.make_optimizer(model)
    slices = fsdp_worker.global_batch().chunk(2)
    for step in range(fsdp_worker.STEPS):
        losses = []
        for part, ids in enumerate(slices):
            torch.manual_seed(fsdp_worker.seed_of(step, part))
            losses.append(model(input_ids=ids, labels=ids).loss)
        torch.stack(losses).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        for part in (0, 1):
            assert records[part]["losses"][step] == pytest.approx(losses[part].item(), abs=1e-5), (step, part)

    # bf16 parameters (fp32 reductions and master weights), the GPU setting: it trains, near the fp32 losses.
    result = subprocess.run([*command, "bf16"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        bf16 = json.loads((tmp_path / f"losses_bf16_rank{rank}.json").read_text())["losses"]
        assert bf16[0] == pytest.approx(records[rank]["losses"][0], rel=2e-2) and bf16[-1] < bf16[0]

    sharded = CalmForCausalLM.from_pretrained(tmp_path / "model")
    expected = model.state_dict()
    assert sharded.state_dict().keys() == expected.keys()
    for name, value in sharded.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-5, msg=name)
