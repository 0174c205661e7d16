"""CALM on decoder backbones other than Llama: `backbone_config` is any decoder-only transformers config, built with
`AutoModel.from_config`. Qwen3 (q/k norms, explicit head_dim) and Mistral (sliding-window attention) go through
training, generation, save/load and, without the package, `trust_remote_code`, as the Llama backbone does."""

import textwrap

import pytest
import torch
from datasets import Dataset
from factories import random_ids, tiny_calm
from transformers import AutoModelForCausalLM, MistralConfig, MistralModel, Qwen3Config, Qwen3Model, TrainingArguments

from transformers_calm import CalmConfig, CalmForCausalLM, CalmTrainer

BACKBONES = {
    "llama": {},
    "qwen3": {"head_dim": 8},
    "mistral": {"sliding_window": 64},
}
AUTOENCODER = {"pad_token_id": 0, "eos_token_id": 2}


def make(backbone_type: str, seed: int = 0) -> CalmForCausalLM:
    return tiny_calm(seed, autoencoder=AUTOENCODER, backbone=BACKBONES[backbone_type], backbone_type=backbone_type)


def test_backbone_classes_come_from_the_backbone_config():
    qwen, mistral = make("qwen3"), make("mistral")
    assert type(qwen.config.backbone_config) is Qwen3Config and type(qwen.model.backbone) is Qwen3Model
    assert type(mistral.config.backbone_config) is MistralConfig and type(mistral.model.backbone) is MistralModel
    assert qwen.get_input_embeddings() is qwen.model.backbone.embed_tokens
    assert qwen.get_input_embeddings().num_embeddings == qwen.config.vocab_size
    # The backbone's pad row is the autoencoder's pad token.
    assert qwen.get_input_embeddings().padding_idx == 0


@pytest.mark.parametrize("backbone_type", sorted(BACKBONES))
def test_training_lowers_the_energy_loss(backbone_type, tmp_path):
    """CalmTrainer trains every backbone: on one repeated batch the energy loss falls."""
    model = make(backbone_type).train()
    ids = random_ids(8, 16, seed=1)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=30,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )

    def seeded_loss():
        torch.manual_seed(0)
        with torch.no_grad():
            return model(ids, labels=ids).loss.item()

    before = seeded_loss()
    CalmTrainer(model=model, args=args, train_dataset=dataset).train()
    model.eval()
    after = seeded_loss()
    assert after < before - 0.05, (before, after)


@pytest.mark.parametrize("backbone_type", sorted(BACKBONES))
def test_generate_with_the_cache_equals_without(backbone_type):
    model = make(backbone_type)
    prompt = random_ids(2, 7, seed=2)
    kwargs = {"max_new_tokens": 9, "eos_token_id": None}
    cached = model.generate(prompt, generator=torch.Generator().manual_seed(3), **kwargs)
    uncached = model.generate(prompt, generator=torch.Generator().manual_seed(3), use_cache=False, **kwargs)
    assert cached.shape == (2, 16)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("backbone_type", sorted(BACKBONES))
def test_save_and_load(backbone_type, tmp_path):
    model = make(backbone_type)
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert type(loaded.config.backbone_config) is type(model.config.backbone_config)
    for name, value in {**BACKBONES[backbone_type], "hidden_size": 32, "num_key_value_heads": 2}.items():
        assert getattr(loaded.config.backbone_config, name) == value, name
    assert type(CalmConfig.from_pretrained(tmp_path / "model").backbone_config) is type(model.config.backbone_config)
    ids = random_ids(2, 12, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).last_hidden_state, model(ids).last_hidden_state, atol=0, rtol=0)
    prompt = random_ids(1, 5, seed=5)
    for m in (model, loaded):
        m.generation_config.eos_token_id = None
    first = model.generate(prompt, max_new_tokens=8, generator=torch.Generator().manual_seed(6))
    second = loaded.generate(prompt, max_new_tokens=8, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, second)


REMOTE_CODE_CHILD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    assert type(model.model.backbone).__name__ == sys.argv[2], type(model.model.backbone).__name__
    expected = torch.load(sys.argv[3])
    with torch.no_grad():
        hidden = model(expected["ids"]).last_hidden_state
    torch.testing.assert_close(hidden, expected["hidden"], atol=0, rtol=0)
    out = model.generate(expected["ids"][:, :5], max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 11), out.shape
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("backbone_type", ["qwen3", "mistral"])
def test_trust_remote_code_without_the_package(backbone_type, tmp_path, run_without_package):
    model = make(backbone_type)
    model.save_pretrained(tmp_path / "model")
    ids = random_ids(2, 12, seed=7)
    with torch.no_grad():
        torch.save({"ids": ids, "hidden": model(ids).last_hidden_state}, tmp_path / "expected.pt")
    backbone_class = type(model.model.backbone).__name__
    run_without_package(REMOTE_CODE_CHILD, [tmp_path / "model", backbone_class, tmp_path / "expected.pt"], cwd=tmp_path)


def test_a_backbone_without_llama_field_names_saves_with_its_card(tmp_path):
    """GPT-2 names its sizes n_embd / n_layer / n_head and has no intermediate_size: the model card reads what exists."""
    model = tiny_calm(
        backbone={"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
        backbone_type="gpt2",
        autoencoder=AUTOENCODER,
    )
    model.save_pretrained(tmp_path / "gpt2-calm")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2-calm").eval()
    ids = random_ids(2, 12, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).last_hidden_state, model(ids).last_hidden_state, atol=0, rtol=0)
    assert "GPT2" in (tmp_path / "gpt2-calm" / "README.md").read_text()


def test_the_callers_backbone_config_is_not_changed():
    backbone = Qwen3Config(vocab_size=32000, pad_token_id=31999, hidden_size=32, head_dim=8)
    config = CalmConfig(backbone_config=backbone, autoencoder_config={"vocab_size": 97, "pad_token_id": 0})
    assert (config.backbone_config.vocab_size, config.backbone_config.pad_token_id) == (97, 0)
    assert (backbone.vocab_size, backbone.pad_token_id) == (32000, 31999)
    assert CalmConfig(backbone_config=backbone) == CalmConfig(backbone_config=backbone)
    assert CalmConfig(backbone_config=backbone, num_samples=8) != CalmConfig(backbone_config=backbone, num_samples=16)
