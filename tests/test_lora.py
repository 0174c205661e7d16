"""LoRA (peft) on CalmForCausalLM and the example `examples/finetune_lora.py`.

Tiny models from `factories`, CPU, offline."""

import importlib
import json
import warnings
from pathlib import Path

import factories
import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, PeftModelForCausalLM
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from transformers_calm import CalmForCausalLM

REPO_ROOT = Path(__file__).resolve().parent.parent

K = 4
AE_KWARGS = {"vocab_size": 53, "patch_size": K, "latent_size": 6, "hidden_size": 16, "intermediate_size": 24}
SPECIAL_TOKENS = {"pad_token_id": 0, "eos_token_id": None}  # no early stop: generate returns exactly max_new_tokens
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

# peft 0.21 calls the deprecated `is_gradient_checkpointing` of transformers 5.x when it wraps a model.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


finetune_lora = importlib.import_module("finetune_lora")  # examples/ is on sys.path (conftest)


def tiny_model(seed=0, autoencoder: dict | None = None) -> CalmForCausalLM:
    """A tiny CALM in eval mode, its head's output layer random; `autoencoder` overrides its vocabulary and special
    tokens (the language model takes them over)."""
    return factories.tiny_calm(seed, autoencoder={**AE_KWARGS, **SPECIAL_TOKENS, **(autoencoder or {})})


def make_ids(batch=2, num_chunks=4, seed=0, vocab_size=AE_KWARGS["vocab_size"]) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab_size, (batch, num_chunks * K), generator=generator)


def seeded(model, input_ids, seed=123):
    """Forward with labels under a fixed seed (the head noise and the target draws are random)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(input_ids=input_ids, labels=input_ids)


def train_steps(model, steps=3, lr=1e-2):
    """A few AdamW steps on the trainable parameters (LoRA weights start with B = 0, i.e. as the identity)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        ids = make_ids(seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def lora_module_names(model):
    return {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def base_state(model):
    """The base model's weights under their plain names (LoRA wrappers' `base_layer` and peft prefixes removed)."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    state = {}
    for name, value in model.state_dict().items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        state[name.replace(".base_layer", "").replace(".original_module", "")] = value.clone()
    return state


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    """A tiny CalmForCausalLM saved with save_pretrained: `(model, directory)`."""
    model = tiny_model(seed=3)
    directory = tmp_path_factory.mktemp("lora") / "base"
    model.save_pretrained(directory)
    return model, directory


# --------------------------------------------------------------------------------------------------------------------
# Where the adapters go, what trains


@pytest.mark.parametrize("targets", [ATTENTION, ATTENTION + MLP, ("v_proj", "down_proj")])
def test_adapters_only_on_the_backbone(targets):
    peft_model = finetune_lora.add_lora(tiny_model(), r=2, alpha=4, target_modules=list(targets))
    assert isinstance(peft_model, PeftModelForCausalLM)
    names = lora_module_names(peft_model.get_base_model())
    expected = {
        f"model.backbone.layers.{i}.{'mlp' if t in MLP else 'self_attn'}.{t}" for i in range(2) for t in targets
    }
    # The autoencoder has gate/up/down_proj layers too: a plain list of names would adapt them as well.
    assert names == expected


def test_unknown_target_module_raises():
    with pytest.raises(ValueError, match="squeeze_layer"):
        finetune_lora.add_lora(tiny_model(), target_modules=["q_proj", "squeeze_layer"])


@pytest.mark.parametrize("train_head", [False, True])
def test_only_lora_and_head_copy_train(train_head):
    model = tiny_model()
    before = base_state(model)
    peft_model = finetune_lora.add_lora(
        model, r=2, alpha=4, target_modules=list(ATTENTION + MLP), train_head=train_head
    )
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    lora = {name for name in trainable if ".lora_A." in name or ".lora_B." in name}
    head = {name for name in trainable if ".generative_head.modules_to_save.default." in name}
    assert lora and trainable == lora | head
    assert bool(head) == train_head
    if train_head:
        assert len(head) == len(list(model.generative_head.original_module.parameters()))

    lora_before = {name: p.detach().clone() for name, p in peft_model.named_parameters() if name in trainable}
    train_steps(peft_model)
    assert not peft_model.get_base_model().autoencoder.training
    after = base_state(peft_model)
    assert after.keys() == before.keys()
    for name, value in before.items():  # base, head (the original when copied) and autoencoder: unchanged
        assert torch.equal(after[name], value), name
    for name, param in peft_model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, lora_before[name]), f"{name} did not train"


def test_lora_starts_as_identity_and_changes_outputs():
    model = tiny_model()
    ids = make_ids()
    reference = seeded(model, ids)
    peft_model = finetune_lora.add_lora(model, r=2, alpha=4)
    torch.testing.assert_close(seeded(peft_model, ids).last_hidden_state, reference.last_hidden_state, atol=0, rtol=0)
    train_steps(peft_model)
    assert not torch.allclose(seeded(peft_model, ids).last_hidden_state, reference.last_hidden_state, atol=1e-4)
    with peft_model.disable_adapter():
        torch.testing.assert_close(seeded(peft_model, ids).loss, reference.loss, atol=0, rtol=0)


def test_gradient_checkpointing_reaches_lora():
    ids = make_ids()
    grads = []
    for checkpointing in (False, True):
        peft_model = finetune_lora.add_lora(tiny_model(), r=2, alpha=4)
        torch.manual_seed(1)
        with torch.no_grad():  # B starts at 0, so A would get no gradient
            for name, param in peft_model.named_parameters():
                if ".lora_B." in name:
                    param.normal_(0.0, 0.1)
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                # Reentrant checkpointing needs inputs that require grad: transformers hooks the output of
                # `get_input_embeddings()` for that (the base is frozen under peft).
                peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            assert all(layer.gradient_checkpointing for layer in peft_model.get_base_model().model.backbone.layers)
        peft_model.train()
        torch.manual_seed(5)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        grads.append({name: p.grad for name, p in peft_model.named_parameters() if p.requires_grad})
    assert all(grad is not None for grad in grads[1].values())
    for name, grad in grads[0].items():
        # Relative only: at initialisation the head passes tiny gradients (~1e-9) to the backbone.
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[1][name], grad, atol=0, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------------------------------------------------
# Save / load / merge / generate


@pytest.mark.parametrize("train_head", [False, True])
def test_adapter_save_and_reload(saved_base, tmp_path, train_head):
    _, base_dir = saved_base
    peft_model = train_steps(
        finetune_lora.add_lora(AutoModelForCausalLM.from_pretrained(base_dir), r=2, alpha=4, train_head=train_head)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    files = {path.name for path in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir) and config["task_type"] == "CAUSAL_LM"
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not [key for key in keys if "autoencoder" in key]
    assert bool([key for key in keys if "generative_head" in key]) == train_head
    assert all("lora_" in key or "generative_head" in key for key in keys)

    ids = make_ids(seed=7)
    reference = seeded(peft_model, ids)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")  # the base found via the adapter config
    for model in (loaded, auto):
        assert isinstance(model, PeftModelForCausalLM) and not model.training
        got = seeded(model, ids)
        torch.testing.assert_close(got.last_hidden_state, reference.last_hidden_state, atol=0, rtol=0)
        torch.testing.assert_close(got.loss, reference.loss, atol=0, rtol=0)


@pytest.mark.parametrize("train_head", [False, True])
def test_merge_and_unload(saved_base, tmp_path, train_head):
    _, base_dir = saved_base
    peft_model = finetune_lora.add_lora(
        AutoModelForCausalLM.from_pretrained(base_dir),
        r=2,
        alpha=4,
        target_modules=list(ATTENTION + MLP),
        train_head=train_head,
    )
    train_steps(peft_model)
    ids = make_ids(seed=8)
    reference = seeded(peft_model, ids)
    merged = peft_model.merge_and_unload()
    assert type(merged) is CalmForCausalLM and not lora_module_names(merged)
    got = seeded(merged, ids)
    torch.testing.assert_close(got.last_hidden_state, reference.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, reference.loss, atol=1e-5, rtol=1e-5)

    merged.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(loaded) is CalmForCausalLM and not any(p.requires_grad for p in loaded.autoencoder.parameters())
    assert loaded.state_dict().keys() == AutoModelForCausalLM.from_pretrained(base_dir).state_dict().keys()
    torch.testing.assert_close(seeded(loaded, ids).last_hidden_state, got.last_hidden_state, atol=0, rtol=0)
    prompt = make_ids(batch=2, num_chunks=2, seed=9)[:, :6]
    sequences = loaded.generate(prompt, max_new_tokens=8)
    assert sequences.shape == (2, 6 + 8) and torch.equal(sequences[:, :6], prompt)


def test_peft_model_generate():
    peft_model = train_steps(finetune_lora.add_lora(tiny_model(), r=2, alpha=4))
    prompt = make_ids(batch=2, num_chunks=2, seed=9)[:, :7]
    sequences = peft_model.generate(input_ids=prompt, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    assert sequences.shape == (2, 7 + 8) and torch.equal(sequences[:, :7], prompt)
    # It is CalmForCausalLM.generate, with the adapters active.
    inner = peft_model.get_base_model().generate(prompt, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sequences, inner)


# --------------------------------------------------------------------------------------------------------------------
# examples/finetune_lora.py


def tiny_tokenizer(texts):
    """A word-level tokenizer trained on `texts`, with pad/bos/eos/unk and BOS prepended (as Llama-3 does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=80, special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def example_setup(tmp_path_factory):
    """A tiny saved CALM + tokenizer, and small train/validation files cut from the WikiText test documents."""
    root = tmp_path_factory.mktemp("finetune")
    with open(REPO_ROOT / "data" / "wikitext_document_level-test.json") as f:
        documents = [" ".join(json.loads(next(f))["text"].split()[:120]) for _ in range(6)]
    for name, docs in (("train.jsonl", documents[:4]), ("validation.jsonl", documents[4:])):
        (root / name).write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    tokenizer = tiny_tokenizer(documents[:4])
    assert tokenizer("the cat")["input_ids"][0] == tokenizer.bos_token_id == 1 and tokenizer.pad_token_id == 0
    model = tiny_model(
        seed=4, autoencoder={"vocab_size": len(tokenizer), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    )
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return root


def run_example(root, output_dir, *extra):
    args = [
        "--model", str(root / "base"),
        "--train_file", str(root / "train.jsonl"),
        "--block_size", "32",
        "--lora_r", "2",
        "--lora_alpha", "4",
        "--learning_rate", "1e-2",
        "--max_steps", "3",
        "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4",
        "--max_new_tokens", "8",
        "--prompt", "The game",
        "--use_cpu",
        "--report_to", "none",
        "--save_strategy", "no",
        "--dataloader_num_workers", "0",
        "--logging_steps", "1",
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return finetune_lora.main(args)


def test_example_trains_and_saves_the_adapter(example_setup, tmp_path, capsys):
    root = example_setup
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    trainer, metrics = run_example(
        root, tmp_path / "out", "--validation_file", str(root / "validation.jsonl"), "--lora_mlp"
    )
    assert trainer.state.global_step == 3 and {"train_loss", "eval_loss", "eval_brierlm"} <= metrics.keys()
    assert type(trainer).__name__ == "CalmTrainer" and "energy_fidelity" in trainer.state.log_history[0]
    peft_model = trainer.model
    assert isinstance(peft_model, PeftModelForCausalLM)
    assert len(lora_module_names(peft_model.get_base_model())) == 2 * 7
    after = base_state(peft_model)
    for name, value in base.state_dict().items():  # the frozen base (autoencoder included) did not move
        assert torch.equal(after[name], value), name

    files = {path.name for path in (tmp_path / "out").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert "model.safetensors" not in files and "merged" not in files
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4 and config["modules_to_save"] is None

    ids = make_ids(seed=3, vocab_size=base.config.vocab_size)
    loaded = PeftModel.from_pretrained(base, tmp_path / "out")
    reference = seeded(peft_model.eval(), ids)
    torch.testing.assert_close(seeded(loaded, ids).last_hidden_state, reference.last_hidden_state, atol=0, rtol=0)
    with loaded.disable_adapter():  # the adapter trained: it changes the model
        assert not torch.allclose(seeded(loaded, ids).last_hidden_state, reference.last_hidden_state, atol=1e-4)
    out = capsys.readouterr().out
    assert "Prompt: 'The game'" in out and "Continuation: " in out


def test_example_refuses_blocks_longer_than_the_context(example_setup, tmp_path):
    context = AutoModelForCausalLM.from_pretrained(example_setup / "base").config.max_tokens
    args = ["--block_size", str(context + K)]
    with pytest.raises(ValueError, match=f"longer than the model's context of {context} tokens"):
        run_example(example_setup, tmp_path / "out", *args)


def test_adapters_in_the_autoencoder_are_refused_with_the_fix():
    """The usual target_modules names ("gate_proj", ...) also name the frozen autoencoder's layers: training refuses
    them and says how to keep adapters to the backbone, which then trains."""
    from peft import LoraConfig, get_peft_model

    everywhere = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj", "gate_proj"]))
    with pytest.raises(ValueError, match="exclude_modules"):
        everywhere.train()
    everywhere.eval()  # running (or loading) such adapters is fine: they are zero and frozen
    kept = get_peft_model(
        tiny_model(), LoraConfig(r=2, target_modules=["q_proj", "gate_proj"], exclude_modules=r".*autoencoder.*")
    )
    kept.train()
    assert lora_module_names(kept.get_base_model()) and not any(
        "autoencoder" in name for name in lora_module_names(kept.get_base_model())
    )


def test_example_merge_with_head(example_setup, tmp_path, capsys):
    root = example_setup
    trainer, _ = run_example(root, tmp_path / "out", "--train_head", "--merge")
    merged_dir = tmp_path / "out" / "merged"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {path.name for path in merged_dir.iterdir()}
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["generative_head"]

    base = AutoModelForCausalLM.from_pretrained(root / "base")
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), tmp_path / "out")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert type(merged) is CalmForCausalLM and not lora_module_names(merged)
    ids = make_ids(seed=4, vocab_size=base.config.vocab_size)
    reference = seeded(adapter, ids)
    got = seeded(merged, ids)
    torch.testing.assert_close(got.last_hidden_state, reference.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, reference.loss, atol=1e-5, rtol=1e-5)
    # the head trained (it is merged in), the autoencoder did not
    head = "generative_head.final_layer.linears.2.weight"
    assert not torch.equal(merged.state_dict()[head], base.state_dict()[head])
    for name, value in base.autoencoder.state_dict().items():
        assert torch.equal(merged.autoencoder.state_dict()[name], value), name

    prompt = ids[:, :6]
    sequences = merged.generate(prompt, max_new_tokens=8, eos_token_id=None)
    assert sequences.shape == (2, 6 + 8) and torch.equal(sequences[:, :6], prompt)
    assert "Continuation: " in capsys.readouterr().out
