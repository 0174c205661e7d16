"""`calm serve` (transformers_calm/serving.py): transformers' OpenAI-compatible server hosting a saved CALM, started on
localhost and queried with the `openai` client: chat completions, completions and responses, streamed and not, the
request options, CALM's own options, and what CALM refuses (an HTTP 400 with its reason, also for streamed requests,
never a 500 or a hang). One server (in a thread of this process) for the module; the benchmark runs `calm serve` as a
child process."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from types import SimpleNamespace

import pytest
from factories import documents, tiny_calm, word_tokenizer

try:  # the serving dependencies (transformers[serving]) and a transformers whose server calm serve is built on
    import transformers_calm.serving  # noqa: F401

    UNAVAILABLE = None
except ImportError as error:
    if not str(error).startswith("calm serve"):  # not its own check: something it imports moved (a failure)
        raise
    UNAVAILABLE = str(error)
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"{UNAVAILABLE}")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTEXT_CHUNKS = 16  # a context of 64 tokens at K = 4
TIMEOUT = 60  # seconds per request: a request that hangs fails the test instead of the run
PROMPT = "The history of the"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`.client` (openai), `.model` (its id), `.app`, `.url`: a tiny CALM (no EOS: every request gets the length it asks for) with a word-level
    tokenizer without chat template, served on a free localhost port, with continuous batching asked for (CALM falls
    back to generate). Stopped after the module."""
    import openai

    from transformers_calm.serving import make_server

    folder = str(tmp_path_factory.mktemp("served") / "calm")
    # transformers' stop strings tokenize "abcdef" to learn how the tokenizer joins tokens: a word of the vocabulary.
    tokenizer = word_tokenizer([*documents(8), "abcdef " * 100])
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": None}
    model = tiny_calm(autoencoder={"vocab_size": len(tokenizer), **special}, backbone={"max_position_embeddings": 16})
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    port = free_port()
    server = make_server(folder, port=port, device="cpu", continuous_batching=True)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    client = openai.OpenAI(base_url=f"http://localhost:{port}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
    yield SimpleNamespace(client=client, model=folder, app=server.config.app, url=f"http://localhost:{port}")
    server.should_exit = True
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "the server did not stop"


def served_model(served):
    """The CalmForCausalLM the server holds."""
    return next(iter(served.app.state.calm["model_manager"].loaded_models.values())).model


def chat(client, model, stream=False, **options):
    messages = [{"role": "user", "content": PROMPT}]
    return client.chat.completions.create(model=model, messages=messages, stream=stream, **options)


def test_models_health_and_continuous_batching_falls_back(served):
    assert [m.id for m in served.client.models.list().data] == [served.model]
    with urllib.request.urlopen(f"{served.url}/health", timeout=TIMEOUT) as response:
        assert json.load(response) == {"status": "ok"}
    state = served.app.state.calm["generation_state"]
    assert state.use_continuous_batching(served_model(served), "LLM") is False  # asked for: falls back to generate


def test_completions_seed_max_tokens_and_stream(served):
    client, model = served.client, served.model
    first = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, seed=3)
    again = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, seed=3)
    assert first.choices[0].text == again.choices[0].text  # same seed, same text
    assert first.usage.completion_tokens == 6  # not a whole number of chunks: cut as a token-level model is
    assert first.choices[0].finish_reason == "length"
    # Streamed: the same text (the chunks arrive as CALM samples them), then the usage.
    pieces = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=6, seed=3, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == first.choices[0].text
    assert len([p for p in pieces if p.choices[0].text]) >= 2
    assert pieces[-1].usage.completion_tokens == 6 and pieces[-1].choices[0].finish_reason == "length"


def test_chat_streamed_and_not(served):
    client, model = served.client, served.model
    reply = chat(client, model, max_tokens=9, seed=4)
    assert reply.choices[0].message.content and reply.usage.completion_tokens == 9
    chunks = list(chat(client, model, stream=True, max_tokens=9, seed=4))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 9 and chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings(served):
    client, model = served.client, served.model
    words = chat(client, model, max_tokens=12, seed=5).choices[0].message.content.split()
    stop = next(word for word in words[2:] if word not in words[:2])
    reply = chat(client, model, max_tokens=12, seed=5, stop=[stop])
    content = reply.choices[0].message.content
    assert content.split() == words[: words.index(stop) + 1]  # stops at the stop string (kept, as transformers does)
    assert reply.choices[0].finish_reason == "stop"


def test_default_length_is_the_context(served):
    client, model = served.client, served.model
    reply = chat(client, model, seed=6)  # no max_tokens: the server's 1024, clamped to the model's context
    prompt_tokens = reply.usage.prompt_tokens
    assert reply.usage.completion_tokens == CONTEXT_CHUNKS * 4 - prompt_tokens - (-prompt_tokens % 4)


def test_temperature_and_calm_options(served):
    client, model = served.client, served.model
    greedy = [chat(client, model, max_tokens=8, temperature=0, seed=s).choices[0].message.content for s in (1, 2)]
    assert all(greedy)  # temperature 0: CALM's do_sample=False (the most frequent of num_candidates samples)
    options = {"num_candidates": 16, "exact_temperature": True}
    assert chat(client, model, max_tokens=8, temperature=0.5, extra_body=options).choices[0].message.content
    config = json.dumps({"num_candidates": 8, "temperature": 0.7, "max_new_tokens": 5})
    reply = chat(client, model, extra_body={"generation_config": config})
    assert reply.usage.completion_tokens == 5
    # They reach CALM's generation config: an invalid value is CALM's error, through either way.
    import openai

    for extra in ({"num_candidates": 0}, {"generation_config": json.dumps({"num_candidates": 0})}):
        with pytest.raises(openai.BadRequestError, match="num_candidates must be an integer >= 1"):
            chat(client, model, max_tokens=8, extra_body=extra)


@pytest.mark.parametrize(
    "endpoint, options, reason",
    [
        ("chat", {"top_p": 0.5}, "top-p .* without computing a likelihood"),
        ("chat", {"logprobs": True, "top_logprobs": 2}, "no token probabilities"),
        ("chat", {"frequency_penalty": 0.5}, "repetition penalty rescales logits"),
        ("chat", {"top_p": 0.5, "stream": True}, "top-p"),  # refused before the stream starts
        ("chat", {"temperature": 1.5, "stream": True}, r"temperature must be in \(0, 1\]"),
        ("chat", {"max_tokens": 500}, "exceed the model's context"),
        ("completions", {"logit_bias": {"5": 2.0}}, "sequence biases shift logits"),
        ("completions", {"logprobs": 2, "stream": True}, "no token probabilities"),
        ("completions", {"presence_penalty": 0.3}, "rescales logits"),
        ("completions", {"seed": -1, "stream": True}, r"seed must be an integer in \[0, 2\*\*63\)"),
    ],
)
def test_refused_options_are_a_400_with_calms_reason(served, endpoint, options, reason):
    import openai

    client, model = served.client, served.model
    options = {"max_tokens": 8, **options}
    with pytest.raises(openai.BadRequestError, match=reason) as raised:
        if endpoint == "chat":
            chat(client, model, **options)
        else:
            client.completions.create(model=model, prompt=PROMPT, **options)
    assert raised.value.status_code == 400
    assert raised.value.body["type"] == "invalid_request_error"


def test_an_error_during_a_streamed_generation_ends_the_stream(served, monkeypatch):
    """An error raised by generate after the stream has started reaches the client as an error event (the stream
    ends; it does not hang), and the server goes on serving."""
    import openai

    client, model = served.client, served.model
    calm = served_model(served)
    sample = calm.sample_next_chunk
    calls = []

    def fail_on_the_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError('head failed: "quoted"\nsecond line')
        return sample(*args, **kwargs)

    monkeypatch.setattr(calm, "sample_next_chunk", fail_on_the_second_chunk)
    received = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in chat(client, model, stream=True, max_tokens=12):
            received.append(chunk)
    assert "head failed" in str(raised.value.body) and "second line" in str(raised.value.body)
    assert any(c.choices and c.choices[0].delta.content for c in received)  # the first chunk's text came through
    monkeypatch.undo()
    assert chat(client, model, max_tokens=4).usage.completion_tokens == 4


def test_responses_streamed_and_not(served):
    client, model = served.client, served.model
    reply = client.responses.create(
        model=model, input=PROMPT, max_output_tokens=8, stream=False, extra_body={"seed": 7}
    )
    assert reply.output_text and reply.status == "completed"
    events = list(
        client.responses.create(model=model, input=PROMPT, max_output_tokens=8, stream=True, extra_body={"seed": 7})
    )
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == reply.output_text
    assert events[-1].type == "response.completed"


@pytest.mark.slow  # `calm serve` as a child process (benchmarks/bench_serve.py --quick)
def test_bench_serve_quick_runs_calm_serve_and_reports_tokens_per_second(tmp_path):
    output = tmp_path / "serve.json"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "bench_serve.py"), "--quick", "--json", str(output)],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    assert [row["streams"] for row in report["results"]] == [1, 4]
    for row in report["results"]:
        assert row["tokens"] == row["streams"] * report["settings"]["new_tokens"] and row["tokens_per_second"] > 0


def test_an_official_checkpoint_as_published_is_served_by_its_class(official_dir, tmp_path):
    """The official folders have no model_type (the Auto classes cannot read them): the manager loads them with
    CalmForCausalLM, and their tokenizer with that config."""
    from transformers_calm import CalmForCausalLM
    from transformers_calm.serving import CalmModelManager

    folder = tmp_path / "CALM-M"
    shutil.copytree(official_dir / "calm", folder)
    word_tokenizer(documents(2)).save_pretrained(folder)  # the authors saved their tokenizer next to the weights
    manager = CalmModelManager(device="cpu", force_model=str(folder))
    model = manager._load_model(str(folder))
    assert isinstance(model, CalmForCausalLM) and model.config.head_type == "energy"
    assert manager._load_processor(str(folder)).chat_template is not None


def test_prompts_padded_at_their_end_as_sft_trains_them():
    """`calm serve --pad_prompts_at_end`: the prompt right-padded with the pad token to whole chunks, the pads read
    as tokens (a model fine-tuned with transformers_calm.sft was trained on prompts padded so)."""
    import torch

    from transformers_calm.serving import CalmRequestError, pad_prompt_at_end

    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    padded = pad_prompt_at_end(inputs, patch_size=4, pad_token_id=0)
    assert padded["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 0, 0]]
    assert padded["attention_mask"].tolist() == [[1] * 8]
    assert pad_prompt_at_end(padded, 4, 0) is padded  # whole chunks already
    with pytest.raises(CalmRequestError, match="needs the model's pad_token_id"):
        pad_prompt_at_end(inputs, 4, None)
