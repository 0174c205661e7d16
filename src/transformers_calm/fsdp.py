"""Sharded training of [`CalmForCausalLM`] with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`): what is sharded,
in which units, and what stays whole.

- **Wrap units**: each decoder layer of the backbone (its class from the backbone model's `_no_split_modules`, e.g.
  `LlamaDecoderLayer`) and each residual block of the generative head (`CalmEnergyHeadBlock`, or `CalmAdaLNBlock` for
  the flow and diffusion heads). A unit's parameters are gathered for its forward and backward only.
- **Kept whole**: the frozen autoencoder. It has no gradients and no optimiser state, and the loss runs its encoder on
  every target chunk, so every process holds all of it (`ignored_params`: replicated, never gathered or reduced).
- **The root unit**: everything else (the token embedding, the input compression, the final norm, the head's input
  and output layers).

Two ways to run it: `accelerate launch --config_file examples/accelerate/fsdp.yaml examples/train_calm.py ...` (the
`Trainer` path; the YAML names the same layer classes and the autoencoder as ignored module (accelerate >= 1.11), and
saves full state dicts; accelerate also makes the input embedding a unit of its own), or
torchrun with [`shard_model`] in a training loop of your own, then [`save_full_model`]. `accelerate` turns FSDP on
for GPU (and other accelerator) runs only; on CPU processes it leaves the model to DDP.
"""

import os

import torch
from torch import nn

from .modeling_calm import CalmForCausalLM

__all__ = [
    "HEAD_BLOCK_CLASSES",
    "fsdp_layer_class_names",
    "fsdp_wrap_modules",
    "full_state_dict",
    "save_full_model",
    "shard_model",
]

# The residual blocks of the three generative heads (modeling_energy_head.py, modeling_flow_head.py; the diffusion
# head uses the flow head's network).
HEAD_BLOCK_CLASSES = ("CalmEnergyHeadBlock", "CalmAdaLNBlock")


def fsdp_layer_class_names(model: CalmForCausalLM) -> list[str]:
    """The class names of the wrap units: the backbone's decoder layer(s), then the head's block, as
    `fsdp_transformer_layer_cls_to_wrap` of an accelerate FSDP config takes them."""
    present = {type(module).__name__ for module in model.modules()}
    backbone = [name for name in model.model.backbone._no_split_modules or () if name in present]
    if not backbone:
        raise ValueError(
            f"The backbone {type(model.model.backbone).__name__} names no decoder layer class in `_no_split_modules`: "
            "FSDP would have no unit smaller than the whole backbone."
        )
    return backbone + [name for name in HEAD_BLOCK_CLASSES if name in present]


def fsdp_wrap_modules(model: CalmForCausalLM) -> list[nn.Module]:
    """The modules [`shard_model`] shards one by one, in the order of `model.modules()` (the autoencoder excluded)."""
    names = set(fsdp_layer_class_names(model))
    autoencoder = set(model.autoencoder.modules())
    return [m for m in model.modules() if type(m).__name__ in names and m not in autoencoder]


def shard_model(
    model: CalmForCausalLM,
    mesh=None,
    mp_policy=None,
    reshard_after_forward: bool = True,
) -> CalmForCausalLM:
    """Apply FSDP2 to `model` in place (call it in every process, after `torch.distributed.init_process_group`, with
    the model on its device) and return it; create the optimiser afterwards, from `model.parameters()`.

    Args:
        model ([`CalmForCausalLM`]): the model; its frozen autoencoder stays whole on every process.
        mesh (`torch.distributed.DeviceMesh`, *optional*): the data-parallel mesh (default: all processes).
        mp_policy (`torch.distributed.fsdp.MixedPrecisionPolicy`, *optional*): e.g. bf16 parameters with fp32
            reductions on GPU, `MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)`.
        reshard_after_forward (`bool`): free each unit's gathered parameters after its forward (less memory, one more
            all-gather per unit in the backward).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    options["mp_policy"] = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    for module in fsdp_wrap_modules(model):
        fully_shard(module, **options)
    fully_shard(model, ignored_params=set(model.autoencoder.parameters()), **options)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model, gathered onto the CPU of process 0 (empty on the others); every
    process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_full_model(model: CalmForCausalLM, save_directory: str | os.PathLike, **kwargs) -> None:
    """Save a sharded model as a whole checkpoint that `from_pretrained` loads (process 0 writes it, atomically);
    every process must call it. `kwargs` go to `save_pretrained`."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    state_dict = full_state_dict(model)
    if dist.get_rank() == 0:
        # fully_shard swaps the model's class for a subclass defined in torch; save_pretrained would copy that
        # subclass's source files beside the model. An unsharded model of the original class saves the weights.
        model_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
        with torch.device("meta"):
            whole = model_class(model.config)
        whole.load_state_dict(state_dict, assign=True)
        whole.tie_weights()
        whole.save_pretrained(save_directory, **kwargs)
    dist.barrier()
