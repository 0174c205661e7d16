"""Run by tests/test_fsdp.py under torchrun (gloo, CPU): a tiny CalmForCausalLM sharded with
`transformers_calm.fsdp.shard_model` trains `STEPS` AdamW steps on a fixed global batch, each process on its slice;
each process writes its losses (`losses_rank{rank}.json`), and the whole model is saved with `save_full_model`.
With `bf16`: bf16 parameters in forward and backward, fp32 reductions and master weights (the GPU setting), losses
only (`losses_bf16_rank{rank}.json`).

    torchrun --standalone --nproc_per_node 2 tests/fsdp_worker.py OUTPUT_DIR [bf16]
"""

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import factories  # noqa: E402

from transformers_calm.fsdp import save_full_model, shard_model  # noqa: E402

STEPS = 3
GLOBAL_BATCH, BLOCK_SIZE = 4, 32


def make_model():
    return factories.tiny_calm(0, backbone={"max_position_embeddings": BLOCK_SIZE // 4}, num_targets=8).train()


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def global_batch():
    return factories.random_ids(GLOBAL_BATCH, BLOCK_SIZE, seed=0)


def seed_of(step, part):
    """The seed of the energy loss's draws (head noise, posterior samples) for one slice of one step's batch."""
    return 1000 * step + part


def main(output_dir, precision="fp32"):
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mp_policy = None
    if precision == "bf16":
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = shard_model(make_model(), mp_policy=mp_policy)
    optimizer = make_optimizer(model)
    ids = global_batch().chunk(world_size)[rank]
    losses = []
    for step in range(STEPS):
        torch.manual_seed(seed_of(step, rank))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()  # FSDP's reduce-scatter averages the gradients over the processes
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    name = f"losses_rank{rank}.json" if precision == "fp32" else f"losses_{precision}_rank{rank}.json"
    with open(os.path.join(output_dir, name), "w") as f:
        json.dump({"world_size": world_size, "losses": losses}, f)
    if precision == "fp32":
        save_full_model(model, os.path.join(output_dir, "model"))
    dist.barrier()
    # The sharded model and its optimiser hold the process group (through the device mesh): freed at interpreter exit,
    # they would destroy it there, outside destroy_process_group, which can abort a process (SIGABRT, "terminate
    # called without an active exception", seen once in CI). Free them first, as examples/scripts.close_distributed
    # does for the Trainer's DDP wrapper.
    del model, optimizer
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
