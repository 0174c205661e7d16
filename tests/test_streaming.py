"""Streamed training data (`transformers_calm.data` with `streaming=True`, `transformers_calm.trainer_streaming`): the
blocks of the pre-tokenised path, each process its own documents, and exact resume on 1 process (in-process) and on 2
(torchrun, gloo). The shards are JSON lines, plain and zstd-compressed, of the bundled WikiText; CPU, offline."""

import json
import math
import os
import subprocess
import sys

import datasets
import factories
import pytest
import torch
import zstandard
from common import StopAt
from factories import documents, word_tokenizer
from transformers import TrainingArguments

from transformers_calm import CalmTrainer, data
from transformers_calm.data import build_blocks, load_blocks, load_documents
from transformers_calm.trainer_streaming import STREAM_STATE_NAME

pytestmark = pytest.mark.filterwarnings("ignore:BrierLM is reported as 0")  # untrained models score <= 0

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 4
BLOCK_SIZE = 32
NUM_SHARDS, DOCUMENTS_PER_SHARD = 4, 4
MAP_BATCH = 3  # documents per map batch: the stream crosses several, and shard boundaries inside them


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """4 shards of 4 documents: shards 0-1 plain JSON lines, 2-3 zstd-compressed; a word tokenizer of them."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    texts = documents(NUM_SHARDS * DOCUMENTS_PER_SHARD, chars=400)
    files = []
    for shard in range(NUM_SHARDS):
        lines = texts[shard * DOCUMENTS_PER_SHARD : (shard + 1) * DOCUMENTS_PER_SHARD]
        payload = "".join(json.dumps({"text": text, "shard": shard}) + "\n" for text in lines).encode()
        if shard < 2:
            path = tmp_path / f"shard{shard}.jsonl"
            path.write_bytes(payload)
        else:
            path = tmp_path / f"shard{shard}.jsonl.zst"
            path.write_bytes(zstandard.ZstdCompressor().compress(payload))
        files.append(str(path))
    return {"dir": tmp_path, "files": files, "texts": texts, "tokenizer": word_tokenizer(texts)}


def streamed_blocks(corpus, files=None, packing="aligned", **kwargs):
    train, _ = load_blocks(
        files or corpus["files"],
        None,
        corpus["tokenizer"],
        K,
        BLOCK_SIZE,
        packing=packing,
        streaming=True,
        map_batch_size=MAP_BATCH,
        **kwargs,
    )
    return train


# -------------------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("packing", ["aligned", "stream"])
def test_streamed_blocks_are_the_pretokenised_blocks(corpus, packing):
    """The same documents (plain and .zst shards, a glob among the paths) give the same blocks, in the same order."""
    files = [corpus["files"][0], str(corpus["dir"] / "shard1.jsonl"), str(corpus["dir"] / "shard*.jsonl.zst")]
    streamed = streamed_blocks(corpus, files, packing=packing)
    assert isinstance(streamed, datasets.IterableDataset)
    documents_ = load_documents(corpus["files"])
    assert documents_["text"] == corpus["texts"]
    pretokenised = build_blocks(documents_, corpus["tokenizer"], K, BLOCK_SIZE, packing=packing, map_batch_size=3)
    expected = pretokenised.to_list()
    assert len(expected) >= 8
    assert list(streamed) == expected
    # With map batches of 1,000 documents (the default), both paths agree too (one batch here).
    default = load_blocks(corpus["files"], None, corpus["tokenizer"], K, BLOCK_SIZE, packing=packing, streaming=True)
    assert list(default[0]) == build_blocks(documents_, corpus["tokenizer"], K, BLOCK_SIZE, packing=packing).to_list()


@pytest.mark.parametrize("num_shards", [4, 3])
def test_each_process_streams_its_own_documents(corpus, monkeypatch, num_shards):
    """On 2 processes no document is tokenised by both and none is left out, whether the shards divide between the
    processes (4: whole shards each) or not (3: every other document)."""
    seen = {}
    tokenise = data.documents_to_ids

    def recording(texts, *args, **kwargs):
        seen.setdefault(rank, []).extend(texts)
        return tokenise(texts, *args, **kwargs)

    monkeypatch.setattr(data, "documents_to_ids", recording)
    files = corpus["files"][:num_shards]
    for rank in (0, 1):
        assert len(list(streamed_blocks(corpus, files, process_index=rank, num_processes=2))) > 0
        seen[rank] = sorted(set(seen[rank]))  # the emptiness check read the first map batch once more
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(corpus["texts"][: num_shards * DOCUMENTS_PER_SHARD])


def test_streaming_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="fewer than block_size=4096 tokens"):
        load_blocks(corpus["files"], None, corpus["tokenizer"], K, 4096, streaming=True)
    with pytest.raises(ValueError, match="mix JSON lines and plain text"):
        load_documents([corpus["files"][0], str(tmp_path / "notes.txt")], streaming=True)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("name", ["train.txt", "train.jsonl"])
def test_missing_empty_and_textless_files_say_so(tmp_path, name, streaming):
    """Instead of datasets' `DatasetGenerationError` (.txt) or a bare `StopIteration` (.jsonl)."""
    with pytest.raises(FileNotFoundError, match="No data file at"):
        load_documents(str(tmp_path / name), streaming=streaming)
    with pytest.raises(FileNotFoundError, match="No data file at"):
        load_documents(str(tmp_path / "shards" / f"*{name}"), streaming=streaming)
    (tmp_path / name).write_text("")
    with pytest.raises(ValueError, match=f"data file {tmp_path / name} is empty"):
        load_documents(str(tmp_path / name), streaming=streaming)
    # An empty shard among others is left to datasets, which skips it; a recursive pattern finds nested files.
    (tmp_path / "deep" / "er").mkdir(parents=True)
    lines = json.dumps({"text": "one document"}) + "\n" if name.endswith("jsonl") else "one document\n"
    (tmp_path / "deep" / "er" / name).write_text(lines)
    (tmp_path / "deep" / f"empty-{name}").write_text("")
    assert next(iter(load_documents(str(tmp_path / "deep" / "**" / f"*{name}"), streaming=streaming)))["text"]
    if not streaming:  # a stream only knows when it is read
        (tmp_path / name).write_text("\n\n" if name.endswith("txt") else json.dumps({"text": " "}) + "\n")
        with pytest.raises(ValueError, match="no document with text"):
            load_documents(str(tmp_path / name))


# ------------------------------------------------------------------------------------------------------ resume


def make_model(tokenizer, seed=0, vocab_size=None):
    autoencoder = {
        "vocab_size": vocab_size or len(tokenizer),
        "patch_size": K,
        "latent_size": 6,
        "hidden_size": 16,
        "intermediate_size": 24,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    backbone = {"max_position_embeddings": BLOCK_SIZE // K}
    return factories.tiny_calm(seed, autoencoder=autoencoder, backbone=backbone, num_targets=8).train()


def make_args(tmp_path, **overrides):
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "report_to": "none",
        "logging_steps": 1,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "linear",
        "max_steps": 8,
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    return TrainingArguments(**{**defaults, **overrides})


def train_logs(trainer):
    return [(e["step"], e["loss"], e["epoch"]) for e in trainer.state.log_history if "loss" in e]


def weights(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("stop", [3, 6])
def test_streamed_resume_is_exact(corpus, monkeypatch, stop):
    """8 steps in one go == `stop` steps, checkpoint, and a resumed run (another model init, a disturbed RNG): the
    same weights bit for bit and the same logs. The stream holds fewer blocks than 8 steps read, so the runs read it
    twice; the checkpoint at step 6 is taken in its second pass. Resuming re-tokenises no document of the batches
    trained on before the checkpoint, except those of the map batch the stream stood in."""
    tokenizer = corpus["tokenizer"]
    files = [corpus["files"][0], corpus["files"][2]]  # a plain and a compressed shard
    num_blocks, batch = len(list(streamed_blocks(corpus, files))), 4
    assert 3 * batch < num_blocks < 6 * batch, num_blocks  # step 3 in the first pass, step 6 in the second

    tokenised = []
    tokenise = data.documents_to_ids
    monkeypatch.setattr(
        data, "documents_to_ids", lambda texts, *a, **kw: tokenised.append(len(texts)) or tokenise(texts, *a, **kw)
    )

    def run(model, callbacks=(), resume=None, **overrides):
        tokenised.clear()
        args = make_args(
            corpus["dir"], save_strategy="steps", save_steps=stop, per_device_train_batch_size=batch, **overrides
        )
        stream = streamed_blocks(corpus, files)
        trainer = CalmTrainer(model=model, args=args, train_dataset=stream, callbacks=list(callbacks))
        tokenised.clear()  # the emptiness check of load_blocks read the first map batch
        trainer.train(resume_from_checkpoint=resume)
        return trainer, sum(tokenised)

    full, _ = run(make_model(tokenizer))
    assert full.state.global_step == 8
    expected = weights(full.model)

    interrupted, _ = run(make_model(tokenizer), callbacks=[StopAt(stop)])
    checkpoint = corpus["dir"] / "out" / f"checkpoint-{stop}"
    record = json.loads((checkpoint / STREAM_STATE_NAME.format(rank=0)).read_text())
    assert (record["rank"], record["world_size"], record["global_step"]) == (0, 1, stop)
    assert record["state"]["epoch"] == (batch * stop - 1) // num_blocks

    torch.manual_seed(1234)
    model = make_model(tokenizer, seed=1)
    torch.rand(7)
    resumed, resumed_documents = run(model, resume=str(checkpoint))
    assert resumed.state.global_step == 8
    final = weights(resumed.model)
    different = [name for name in expected if not torch.equal(final[name], expected[name])]
    assert not different, f"resumed run differs from the uninterrupted one in {different}"
    assert train_logs(resumed) == train_logs(full)
    # The documents of the remaining steps, plus at most one map batch (per map) re-read at the stream's position.
    remaining_passes = batch * (8 - stop) / num_blocks
    assert resumed_documents <= math.ceil(remaining_passes + 1) * 2 * DOCUMENTS_PER_SHARD + 2 * MAP_BATCH


@pytest.mark.parametrize("resume_step", [4, 5])
def test_streamed_resume_at_the_end_of_a_pass(tmp_path, resume_step):
    """A stream of 8 blocks, 1 block per batch and 2 accumulated batches per step: the checkpoint at step 4 is taken
    at the very end of the first pass (the resumed run starts with an empty rest of that pass, then the next), the one
    at step 5 inside the second. Both resume to the uninterrupted run's weights, bit for bit."""
    ids = factories.random_ids(8, BLOCK_SIZE, vocab_size=50, low=4, seed=3).tolist()
    blocks = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})

    def run(model, callbacks=(), resume=None):
        args = make_args(
            tmp_path, max_steps=7, per_device_train_batch_size=1, gradient_accumulation_steps=2,
            save_strategy="steps", save_steps=resume_step,
        )  # fmt: skip
        stream = blocks.to_iterable_dataset()
        trainer = CalmTrainer(model=model, args=args, train_dataset=stream, callbacks=list(callbacks))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    tokenizer = word_tokenizer(["a b c"])  # ids 0..3 are its special tokens, like the blocks' range
    full = run(make_model(tokenizer, vocab_size=50))
    run(make_model(tokenizer, vocab_size=50), callbacks=[StopAt(resume_step)])
    checkpoint = tmp_path / "out" / f"checkpoint-{resume_step}"
    record = json.loads((checkpoint / STREAM_STATE_NAME.format(rank=0)).read_text())
    assert record["state"]["epoch"] == (resume_step - 1) // 4
    resumed = run(make_model(tokenizer, vocab_size=50, seed=1), resume=str(checkpoint))
    assert resumed.state.global_step == 7
    expected, final = weights(full.model), weights(resumed.model)
    assert not [name for name in expected if not torch.equal(final[name], expected[name])]
    assert train_logs(resumed) == train_logs(full)


def test_streamed_training_errors(corpus):
    tokenizer = corpus["tokenizer"]
    args = make_args(corpus["dir"], dataloader_num_workers=1)
    trainer = CalmTrainer(model=make_model(tokenizer), args=args, train_dataset=streamed_blocks(corpus))
    with pytest.raises(ValueError, match="dataloader_num_workers=0"):
        trainer.train()

    args = make_args(corpus["dir"], max_steps=2, save_strategy="steps", save_steps=2)
    CalmTrainer(model=make_model(tokenizer), args=args, train_dataset=streamed_blocks(corpus)).train()
    checkpoint = corpus["dir"] / "out" / "checkpoint-2"
    state_file = checkpoint / STREAM_STATE_NAME.format(rank=0)
    record = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**record, "world_size": 2}))
    args = make_args(corpus["dir"], max_steps=4)
    trainer = CalmTrainer(model=make_model(tokenizer), args=args, train_dataset=streamed_blocks(corpus))
    with pytest.raises(ValueError, match="saved by a streamed run on 2 processes, this one has 1"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    state_file.unlink()
    with pytest.raises(ValueError, match="has no stream state for process 0"):
        trainer.train(resume_from_checkpoint=True)  # the last checkpoint of output_dir
    # ignore_data_skip: the stream starts again from its beginning (after steps 3-4 it stands where the first run's
    # stood after steps 1-2), the rest of the state is the checkpoint's.
    args = make_args(corpus["dir"], max_steps=4, ignore_data_skip=True)
    trainer = CalmTrainer(model=make_model(tokenizer), args=args, train_dataset=streamed_blocks(corpus))
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 4
    assert trainer._train_stream.state_dict() == record["state"]


@pytest.mark.slow  # torchrun, 2 processes, 3 runs
def test_streamed_resume_on_two_processes_is_exact(corpus):
    """examples/train_calm.py --streaming on 2 processes (gloo, 4 shards: 2 each), 2 accumulated batches per step: 6
    steps straight, and 3 steps then --resume_from_checkpoint to 6, end with the same weights bit for bit; each
    process saved its own stream state."""
    root = corpus["dir"]
    tokenizer = corpus["tokenizer"]
    autoencoder = make_model(tokenizer).autoencoder
    autoencoder.save_pretrained(root / "autoencoder")
    tokenizer.save_pretrained(root / "autoencoder")
    texts = documents(2, skip=20)
    (root / "validation.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    def launch(output_dir, checksums, *extra):
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(root / "datasets-cache-ddp"),
            "OMP_NUM_THREADS": "1",
            "TRANSFORMERS_CALM_WEIGHT_CHECKSUM_DIR": str(checksums),
        }
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(REPO_ROOT, "examples", "train_calm.py"),
            "--autoencoder", str(root / "autoencoder"), "--train_file", *corpus["files"], "--streaming",
            "--validation_file", str(root / "validation.jsonl"), "--max_eval_samples", "2",
            "--block_size", str(BLOCK_SIZE), "--hidden_size", "32", "--intermediate_size", "48",
            "--num_hidden_layers", "2", "--num_attention_heads", "4", "--num_key_value_heads", "2",
            "--num_mlp_layers", "2", "--noise_size", "8", "--num_samples", "4", "--num_targets", "8",
            "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
            "--per_device_eval_batch_size", "1", "--logging_steps", "1",
            "--report_to", "none", "--use_cpu", "--seed", "0", "--disable_tqdm", "true",
            "--dataloader_num_workers", "0", "--output_dir", str(output_dir), *extra,
        ]  # fmt: skip
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        records = [json.loads((checksums / f"weights_rank{rank}.json").read_text()) for rank in (0, 1)]
        assert records[0]["sha256"] == records[1]["sha256"]
        return records[0]["sha256"]

    straight = launch(root / "straight", root / "sums-straight", "--max_steps", "6")
    launch(root / "resumed", root / "sums-first", "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "3")
    checkpoint = root / "resumed" / "checkpoint-3"
    states = [json.loads((checkpoint / STREAM_STATE_NAME.format(rank=r)).read_text()) for r in (0, 1)]
    assert [(s["rank"], s["world_size"]) for s in states] == [(0, 2), (1, 2)]
    assert all(s["global_step"] == 3 and s["state"]["epoch"] == 0 for s in states)
    resumed = launch(
        root / "resumed", root / "sums-resumed", "--max_steps", "6", "--resume_from_checkpoint", str(checkpoint)
    )
    assert resumed == straight


def test_llama_baseline_trains_on_streamed_blocks(corpus):
    """examples/train_llama_baseline.py --streaming: the discrete baseline reads and checkpoints the stream as CALM
    does (its Trainer takes the same mixin)."""
    import importlib

    baseline = importlib.import_module("train_llama_baseline")  # examples/ is on sys.path (conftest)
    corpus["tokenizer"].save_pretrained(corpus["dir"] / "tokenizer")
    # fmt: off
    trainer, _ = baseline.main([
        "--tokenizer", str(corpus["dir"] / "tokenizer"), "--train_file", *corpus["files"], "--streaming",
        "--block_size", str(BLOCK_SIZE), "--hidden_size", "32", "--intermediate_size", "48",
        "--num_hidden_layers", "2", "--num_attention_heads", "2", "--num_key_value_heads", "2",
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_strategy", "steps", "--save_steps", "2",
        "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0", "--output_dir", str(corpus["dir"] / "llama"),
    ])
    # fmt: on
    assert isinstance(trainer.train_dataset, datasets.IterableDataset) and trainer.state.global_step == 2
    assert (corpus["dir"] / "llama" / "checkpoint-2" / STREAM_STATE_NAME.format(rank=0)).is_file()
