"""The `calm` command line (`transformers_calm.cli`): `calm train` from text files to a CALM that `from_pretrained`,
`pipeline` and `calm generate` load; resuming; `calm evaluate`; `calm convert`; `train_tokenizer`."""

import json

import pytest
import torch
from factories import documents
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from transformers_calm import CalmForCausalLM, CalmTrainer
from transformers_calm.cli import main
from transformers_calm.tokenization import train_tokenizer

# A preset smaller than "tiny", for seconds of CPU: the command line and the files, not the quality.
SMALL = {"vocab_size": 300, "block_size": 32, "batch_size": 2, "ae_hidden_size": 32, "ae_intermediate_size": 48,
         "hidden_size": 32, "intermediate_size": 64, "ae_steps": 4, "lm_steps": 4, "num_attention_heads": 2}  # fmt: skip


def small(**overrides) -> list[str]:
    return [part for name, value in {**SMALL, **overrides}.items() for part in (f"--{name}", str(value))]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents(20, chars=2000)))
    return path


@pytest.fixture(scope="module")
def trained(text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("calm") / "model"
    assert main(["train", str(text_file), "--output_dir", str(out), *small()]) == 0
    return out


def test_train_writes_a_model_that_transformers_loads(trained):
    model = AutoModelForCausalLM.from_pretrained(trained)
    assert isinstance(model, CalmForCausalLM) and model.config.head_type == "flow"  # the small-scale recipe
    assert model.config.latent_size == 32 and model.config.backbone_config.max_position_embeddings == 32 // 4
    tokenizer = AutoTokenizer.from_pretrained(trained)
    assert tokenizer.pad_token_id == 0 and len(tokenizer) == model.config.vocab_size
    assert (trained / "autoencoder" / "config.json").is_file() and (trained / "README.md").is_file()
    text = pipeline("text-generation", model=str(trained))("The game", max_new_tokens=8)[0]["generated_text"]
    assert text.startswith("The game") and len(text) > len("The game")


def test_generate_prints_each_prompt_with_its_continuation(trained, capsys):
    assert (
        main(["generate", str(trained), "The game", "In 1996 ,", "--max_new_tokens", "8", "--temperature", "0.5"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("The game") and lines[1].startswith("In 1996 ,")


def test_evaluate_prints_brierlm(trained, text_file, capsys):
    main(["evaluate", str(trained), str(text_file), "--context_length", "32", "--max_blocks", "2"])
    result = json.loads(capsys.readouterr().out)
    assert {"brierlm", "brier1", "brier4"} <= result.keys()


def test_train_resumes_and_skips_what_is_done(trained, text_file, tmp_path, capsys, monkeypatch):
    main(["train", str(text_file), "--output_dir", str(trained), *small()])  # a finished run: nothing to do
    assert "holds a trained CALM already" in capsys.readouterr().err
    # A run stopped in the language model's stage at step 5 of 8, after its checkpoint at step 4.
    out = tmp_path / "resumed"
    step = CalmTrainer.training_step

    def stop_at_five(self, *args, **kwargs):
        if self.state.global_step == 5:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(CalmTrainer, "training_step", stop_at_five)
        with pytest.raises(KeyboardInterrupt):
            main(["train", str(text_file), "--output_dir", str(out), *small(lm_steps=8)])
    assert [path.name for path in (out / "checkpoints" / "calm").iterdir()] == ["checkpoint-4"]
    assert not (out / "model.safetensors").exists()
    main(["train", str(text_file), "--output_dir", str(out), *small(lm_steps=8)])  # the same command again
    assert "(already trained)" in capsys.readouterr().err  # the autoencoder's stage is not run again
    state = json.loads((out / "checkpoints" / "calm" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and (out / "model.safetensors").is_file()


def test_a_run_with_other_settings_or_a_foreign_folder_is_refused(trained, text_file, tmp_path):
    with pytest.raises(ValueError, match="holds a run with other settings.*vocab_size 300 -> 500"):
        main(["train", str(text_file), "--output_dir", str(trained), *small(vocab_size=500)])
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not made by calm train"):
        main(["train", str(text_file), "--output_dir", str(foreign), "--restart", *small()])
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_restart_removes_only_what_calm_train_wrote(text_file, tmp_path):
    out = tmp_path / "run"
    main(["train", str(text_file), "--output_dir", str(out), *small()])
    (out / "notes.txt").write_text("keep me")
    main(["train", str(text_file), "--output_dir", str(out), "--restart", *small(vocab_size=400)])
    assert (out / "notes.txt").read_text() == "keep me"
    assert AutoTokenizer.from_pretrained(out).vocab_size <= 400 and (out / "model.safetensors").is_file()


def test_convert_and_help_reach_their_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0 and "--autoencoder" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--preset" in capsys.readouterr().out


def test_train_tokenizer_recipe():
    tokenizer = train_tokenizer(["hello world, hello there"] * 20, vocab_size=300, show_progress=False)
    ids = tokenizer("hello world")["input_ids"]
    assert tokenizer.pad_token_id == 0 and ids[0] == tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world"
    assert tokenizer.decode(tokenizer("naïve ☃")["input_ids"], skip_special_tokens=True) == "naïve ☃"  # bytes
    with pytest.raises(ValueError, match="256 bytes"):
        train_tokenizer(["a"], vocab_size=100)
    assert torch.is_tensor(tokenizer("x", return_tensors="pt")["input_ids"])


def test_a_causal_lm_loader_on_the_autoencoder_folder_says_what_it_holds(trained):
    with pytest.raises(ValueError, match=r"CALM autoencoder .*not a language model.*AutoModel\.from_pretrained"):
        AutoModelForCausalLM.from_pretrained(trained / "autoencoder")
    with pytest.raises(ValueError, match="not a language model"):
        pipeline("text-generation", model=str(trained / "autoencoder"))
    config = AutoModelForCausalLM.from_pretrained(trained).config.autoencoder_config
    with pytest.raises(ValueError, match="not a language model"):
        AutoModelForCausalLM.from_config(config)
