"""The demo pipeline (examples/demo.py) and the discrete baseline script (examples/train_llama_baseline.py), run end
to end with tiny sizes so that they keep working; `make demo` runs the full-size demo."""

import ast
import json
import os

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, pipeline

from transformers_calm import CalmForCausalLM
from transformers_calm.brierlm import score_model

pytestmark = [
    pytest.mark.slow,  # the whole demo pipeline
    pytest.mark.filterwarnings("ignore:BrierLM is reported as 0"),  # untrained models score <= 0
]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKITEXT = os.path.join(REPO_ROOT, "data", "wikitext_document_level-test.json")
import demo  # noqa: E402  (examples/ is on sys.path: conftest)
import train_llama_baseline  # noqa: E402


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """Run the whole demo once with tiny sizes on 8 short WikiText documents (2 held out)."""
    root = tmp_path_factory.mktemp("demo")
    with open(WIKITEXT, encoding="utf-8") as f:
        texts = [json.loads(line)["text"][:2000] for line in f][:8]
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    output_dir = root / "out"
    # fmt: off
    summary = demo.main([
        "--output_dir", str(output_dir), "--train_files", str(data), "--num_heldout_documents", "2",
        "--vocab_size", "320", "--block_size", "32", "--batch_size", "4",
        "--latent_size", "8", "--ae_hidden_size", "16", "--ae_intermediate_size", "32", "--ae_steps", "3",
        "--hidden_size", "32", "--intermediate_size", "48", "--num_hidden_layers", "2", "--num_attention_heads", "2",
        "--num_mlp_layers", "1", "--lm_steps", "3",
        "--max_new_tokens", "8", "--num_candidates", "8",
    ])
    # fmt: on
    return output_dir, summary, texts


def test_demo_is_calm_train_with_a_baseline_around_it():
    """The demo imports no example script: its CALM is `calm train`'s (the package's command line, called in Python),
    and its baseline is trained with transformers' own Trainer."""
    examples = {name[: -len(".py")] for name in os.listdir(os.path.join(REPO_ROOT, "examples")) if name.endswith(".py")}
    tree = ast.parse(open(demo.__file__, encoding="utf-8").read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & examples and "transformers_calm.cli" in imported
    assert demo.train_command.__module__ == "transformers_calm.cli"


def test_demo_writes_every_output(tiny_demo):
    output_dir, summary, _ = tiny_demo
    for name in ("calm/tokenizer", "calm/autoencoder", "calm", "data"):
        assert (output_dir / name).is_dir(), name
    settings = json.loads((output_dir / "calm" / "calm_train.json").read_text())["settings"]
    assert settings["lm_steps"] == 3 and settings["head_type"] == "flow"  # the demo's options reached calm train
    png = (output_dir / "training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert json.loads((output_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert set(summary["timings"]) >= {
        "2. calm train (tokenizer, autoencoder, CALM)",
        "3. held-out reconstruction",
        "4. Llama baseline training",
        "5. generation",
        "total",
    }
    assert (output_dir / "llama" / "config.json").is_file()


def test_demo_results_are_measured(tiny_demo):
    _, summary, _ = tiny_demo
    results = summary["results"]
    assert 0 <= results["heldout_token_accuracy"] <= 1 and 0 <= results["heldout_chunk_accuracy"] <= 1
    assert results["brierlm"] >= 0
    for n in range(1, 5):  # each an average of (0/1 + 0/1 - 0/1) terms
        assert -1 <= results[f"brier{n}"] <= 2
    assert results["brier1"] != 0 or results["brier4"] != 0  # the estimator ran on real samples
    assert torch.isfinite(torch.tensor(results["eval_head_loss"]))
    assert torch.isfinite(torch.tensor(results["llama_eval_loss"]))


def test_demo_sample_continues_a_heldout_prompt(tiny_demo):
    output_dir, summary, texts = tiny_demo
    sample = summary["sample"]
    words = " ".join(texts[-2].split()[:24])
    # The prompt is the first held-out words, cut from the left to fit the tiny context (8 chunks = 32 tokens).
    assert words.endswith(sample["prompt"].strip()) and len(sample["prompt"].split()) >= 2
    tokenizer = AutoTokenizer.from_pretrained(output_dir / "calm")
    new_tokens = tokenizer(sample["continuation"], add_special_tokens=False).input_ids
    assert 0 < len(new_tokens) <= 8 + 4  # 8 new tokens (specials skipped), BPE may re-split a little
    # The Llama baseline continues the same prompt (an untrained Llama's random byte-level tokens re-split more).
    llama_tokens = tokenizer(sample["llama_continuation"], add_special_tokens=False).input_ids
    assert 0 < len(llama_tokens) <= 3 * 8


def test_demo_defaults_are_the_benchmarks_recipe():
    """The demo trains CALM with `calm train --preset cpu` and the small-scale recipe, which benchmarks/
    bench_quality.py measures as `calm-recipe`."""
    import importlib.util

    from transformers_calm.cli import PRESETS, RECIPES

    spec = importlib.util.spec_from_file_location(
        "bench_quality", os.path.join(REPO_ROOT, "benchmarks", "bench_quality.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = demo.parse_args([])
    assert (args.preset, args.recipe) == ("cpu", "small-scale") and args.hidden_size is None  # the preset's sizes
    recipe, settings = bench.RECIPE, {**PRESETS["cpu"], **RECIPES["small-scale"]}
    assert settings["head_type"] == recipe["head_type"] and settings["latent_size"] == recipe["latent_size"]
    assert settings["head_learning_rate_scale"] == recipe["head_lr_scale"]
    assert settings["lr_scheduler_type"] == recipe["lr_scheduler_type"]


def test_demo_checkpoint_loads_with_its_card(tiny_demo):
    output_dir, summary, _ = tiny_demo
    model = AutoModelForCausalLM.from_pretrained(output_dir / "calm")
    assert isinstance(model, CalmForCausalLM)
    card = ModelCard.load(output_dir / "calm" / "README.md")
    assert "calm" in card.data.tags and card.data.library_name == "transformers"
    assert "## Evaluation results" in card.text
    for name in ("brierlm", "brier1", "heldout_token_accuracy"):
        assert f"| {name} | {summary['results'][name]:.6g} |" in card.text


def test_llama_baseline_trains_on_the_same_blocks_and_scores(tiny_demo, tmp_path):
    output_dir, _, _ = tiny_demo
    # fmt: off
    trainer, metrics = train_llama_baseline.main([
        "--tokenizer", str(output_dir / "calm"), "--train_file", str(output_dir / "data" / "train.jsonl"),
        "--validation_file", str(output_dir / "data" / "validation.jsonl"), "--block_size", "32",
        "--hidden_size", "32", "--intermediate_size", "48", "--num_hidden_layers", "2", "--num_attention_heads", "2",
        "--num_key_value_heads", "2", "--max_steps", "4", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-3", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
        "--output_dir", str(tmp_path / "llama"),
    ])
    # fmt: on
    assert trainer.state.global_step == 4 and torch.isfinite(torch.tensor(metrics["eval_loss"]))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    assert isinstance(model, LlamaForCausalLM)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llama")
    calm_tokenizer = AutoTokenizer.from_pretrained(output_dir / "calm")
    assert model.config.vocab_size == len(calm_tokenizer) == len(tokenizer)
    texts = [json.loads(line)["text"] for line in (output_dir / "data" / "validation.jsonl").open()]
    scores = score_model(model, texts=texts, tokenizer=tokenizer, context_length=32, max_blocks=2, progress=False)
    assert {"brier1", "brier4", "brierlm", "exact_brier1"} <= set(scores)


def test_text_generation_pipeline_on_the_trained_checkpoint(tiny_demo):
    """`pipeline("text-generation")` from the directory the demo trained (model, tokenizer, generation_config.json):
    as for any causal LM, the output is the prompt followed by new text, and `return_full_text=False` gives the new
    text alone; temperature works without logits, stop strings end the text."""
    output_dir, _, texts = tiny_demo
    generator = pipeline("text-generation", model=str(output_dir / "calm"), device="cpu")
    prompt = " ".join(texts[-1].split()[:6])
    torch.manual_seed(0)
    full = generator(prompt, max_new_tokens=8, temperature=0.5, num_candidates=8)[0]["generated_text"]
    assert full.startswith(prompt) and len(full) > len(prompt)
    torch.manual_seed(0)
    new = generator(prompt, max_new_tokens=8, temperature=0.5, num_candidates=8, return_full_text=False)
    assert new[0]["generated_text"] and full.endswith(new[0]["generated_text"])
    # A stop sequence (the pipeline passes it to generate as stop_strings, with its tokenizer) that the continuation
    # contains cuts it right after its first occurrence.
    stop = new[0]["generated_text"].strip()[:1]
    torch.manual_seed(0)
    stopped = generator(
        prompt, max_new_tokens=8, temperature=0.5, num_candidates=8, return_full_text=False, stop_sequence=stop
    )[0]["generated_text"]
    assert stop in stopped and len(stopped) <= len(new[0]["generated_text"])
