"""The documentation runs: every fenced code block of README.md and docs/*.md, in order, page by page, in a workspace
laid out as the pages assume (a trained CALM at `outputs/first` and `my-calm`, the official checkpoints' folders
`CALM-Autoencoder/` and `CALM-M/` (the official-code fixtures), text files, `data/`, `examples/`, `benchmarks/`), with
the Hub mocked: a documented command or option that no longer works fails here.

How a block runs:
- Python: executed, the blocks of a page one after the other in one namespace. Names a block uses without defining
  them are the reader's own objects (`model`, `tokenizer`, `calm`, `llama`, `documents`, `input_ids`;
  `readers_objects`).
- Shell, by program (`run_command`):
  - the package's and the repository's scripts (`calm`, `python -m transformers_calm.*`, `python examples/*.py`,
    `python benchmarks/*.py`) run in this process through their `main(argv)`, with TINY's arguments appended (argparse:
    the last value wins), so that every documented option is parsed and used at a size of seconds;
  - those that are hours even in their quick mode, or compile (PARSE_ONLY), and those that need GPUs or several machines
    (`accelerate launch`, `torchrun --nnodes`), only have their arguments parsed by the script's own parser and the
    files they name checked; test_benchmarks.py runs every benchmark in its quick mode, compile included;
  - `torchrun --nproc_per_node 2` runs for real on 2 CPU processes, once per session for the same launcher and
    script (later ones are parsed); `...same arguments...` stands for the previous command's arguments;
  - `make T` runs `make -n T` (CI runs `make test` itself; test_demo.py runs the demo): the target and recipe exist;
  - `pip install R` checks that this environment satisfies R (and that the package is installed from this clone);
  - `cp` runs; `hf upload` runs huggingface_hub's command line against the mocked Hub.
- The README's first steps run as written, at their documented size, timed: the newcomer's first generation.
"""

import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch
from common import mocked_hub
from factories import documents
from packaging.requirements import Requirement
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, LlamaConfig, LlamaForCausalLM

import transformers_calm
from transformers_calm.cli import main as calm_main

REPO_ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / "docs").glob("*.md"))]
NOT_CODE = {"bibtex"}  # fenced blocks that are not run (a citation)

# The size of every documented training command here: a few steps of a model of a few thousand parameters.
SMALL_CALM = ["--vocab_size", "300", "--block_size", "32", "--batch_size", "2", "--ae_hidden_size", "32",
              "--ae_intermediate_size", "48", "--hidden_size", "32", "--intermediate_size", "64", "--ae_steps", "2",
              "--lm_steps", "2", "--num_attention_heads", "2"]  # fmt: skip
TRAINING = ["--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--max_steps", "2",
            "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--block_size", "32"]  # fmt: skip
TINY = {
    "calm train": SMALL_CALM,
    "examples/train_autoencoder.py": [
        *TRAINING,
        "--hidden_size",
        "16",
        "--intermediate_size",
        "24",
        "--latent_size",
        "8",
        "--max_eval_samples",
        "2",
    ],  # fmt: skip
    "examples/train_calm.py": [
        *TRAINING,
        "--hidden_size",
        "32",
        "--intermediate_size",
        "48",
        "--num_hidden_layers",
        "1",
        "--num_attention_heads",
        "2",
        "--num_key_value_heads",
        "2",
        "--num_mlp_layers",
        "1",
        "--eval_steps",
        "1",
        "--max_eval_samples",
        "2",
    ],  # fmt: skip
    "examples/finetune_lora.py": [*TRAINING, "--max_new_tokens", "8"],
    # The arithmetic demo's base CALM and its SFT at a size of seconds (--base_args: calm train's sizes, the last wins).
    "examples/sft.py": [
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--save_strategy",
        "no",
        "--use_cpu",
        "--task_heldout",
        "4",
        "--num_candidates",
        "8",
        "--base_args",
        " ".join(SMALL_CALM),
    ],  # fmt: skip
    "benchmarks/bench_generate.py": ["--quick"],
    "benchmarks/bench_train.py": ["--quick"],
    "benchmarks/bench_quality.py": ["--quick"],
    "benchmarks/bench_serve.py": ["--quick"],
}
# Parsed, not run: hours in their quick mode or compiling (test_benchmarks.py runs them quick, compile included).
PARSE_ONLY = {
    "benchmarks/bench_streaming.py": "launches train_calm.py on 2 processes 8 times even with --quick",
    "--compile": "compiles both models (inductor); test_benchmarks.py runs --compile in quick mode",
}


@dataclass
class Block:
    page: str
    line: int
    language: str
    text: str

    def __str__(self):
        return f"{self.page}:{self.line} ({self.language})"


def code_blocks(page: str) -> list[Block]:
    """The fenced blocks of a Markdown page, with the line of their opening fence."""
    blocks, current = [], None
    for number, line in enumerate((REPO_ROOT / page).read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith("```"):
            if current is None:
                current = Block(page, number, line[3:].strip(), "")
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.text += line + "\n"
    assert current is None, f"{page}: a code block opened at line {current.line} is never closed"
    return blocks


def shell_commands(text: str) -> list[list[str]]:
    """The commands of a shell block: continued lines joined, comments dropped, the previous command of the same
    script standing for `...same arguments...`."""
    commands = []
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        if "...same arguments..." in line:
            script = next(word for word in line.split() if word.endswith(".py"))
            earlier = next(command for command in reversed(commands) if script in command)
            line = line.replace("...same arguments...", shlex.join(earlier[earlier.index(script) + 1 :]))
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


# ------------------------------------------------------------------------------------------------------ the workspace


def write_jsonl(path: Path, count: int) -> None:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents(count, chars=4000)))


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """What the pages assume exists before their first block: a CALM trained by `calm train` (block 512, so that the
    pages' 256-token generations fit its context; at most 500 draws per chunk of exact temperature), the official
    checkpoints' folders, text files, and a tokenizer under a Hub id's name (a local folder is read first)."""
    root = tmp_path_factory.mktemp("scene")
    write_jsonl(root / "train.jsonl", 40)
    calm = root / "outputs" / "first"
    argv = ["train", str(root / "train.jsonl"), "--output_dir", str(calm), *SMALL_CALM, "--block_size", "512"]
    assert calm_main(argv) == 0
    # The pages' exact temperature sampling: a model this untrained has a flat distribution, where each chunk would
    # draw the default 10,000 head samples before falling back to the approximation; 500 are enough to run the code.
    config = json.loads((calm / "generation_config.json").read_text())
    (calm / "generation_config.json").write_text(json.dumps({**config, "max_draws": 500}))
    shutil.copytree(calm, root / "my-calm")
    shutil.copytree(calm / "tokenizer", root / "meta-llama" / "Meta-Llama-3-8B")
    shutil.copy(root / "train.jsonl", root / "my_domain.jsonl")
    shutil.copytree(REPO_ROOT / "tests" / "fixtures" / "official-tiny" / "autoencoder", root / "CALM-Autoencoder")
    shutil.copytree(REPO_ROOT / "tests" / "fixtures" / "official-tiny" / "calm", root / "CALM-M")
    # The Hub repositories as published (a local folder is read first), the tokenizer saved next to the weights.
    shutil.copytree(root / "CALM-Autoencoder", root / "cccczshao" / "CALM-Autoencoder")
    shutil.copytree(root / "CALM-M", root / "cccczshao" / "CALM-M")
    shutil.copytree(calm / "tokenizer", root / "cccczshao" / "CALM-M", dirs_exist_ok=True)
    return root


@pytest.fixture
def workspace(scene, tmp_path, monkeypatch) -> Path:
    """A copy of the scene for one page (its commands write there), the repository's folders linked in; the page
    runs with it as the working directory."""
    root = tmp_path / "workspace"
    shutil.copytree(scene, root)
    for name in ("data", "examples", "benchmarks", "model_cards"):
        (root / name).symlink_to(REPO_ROOT / name)
    monkeypatch.chdir(root)
    return root


@contextlib.contextmanager
def offline_hub():
    """The Hub mocked (common.mocked_hub), for `push_to_hub`, the module-level `create_repo`/`upload_folder` of
    huggingface_hub and its `hf upload` (through the single-commit upload path). The Hub's check of an uploaded
    card's metadata is made here: its YAML must parse."""
    import huggingface_hub
    import huggingface_hub.hf_api as hf_api

    def validate_yaml(self, content, **kwargs):
        huggingface_hub.RepoCard(content)  # raises on metadata that is not a YAML mapping

    with mocked_hub() as hub, contextlib.ExitStack() as stack:
        if hasattr(hf_api, "is_xet_available"):
            stack.enter_context(mock.patch.object(hf_api, "is_xet_available", return_value=False))
        if hasattr(huggingface_hub.HfApi, "_validate_yaml"):
            stack.enter_context(mock.patch.object(huggingface_hub.HfApi, "_validate_yaml", validate_yaml))
        api = huggingface_hub.HfApi()
        for name in ("create_repo", "upload_folder"):
            stack.enter_context(mock.patch.object(huggingface_hub, name, getattr(api, name)))
        yield hub


def readers_objects(workspace: Path) -> dict:
    """What the pages call the reader's own model, tokenizer, documents and a token-level LM (and torch)."""
    tokenizer = AutoTokenizer.from_pretrained(workspace / "outputs" / "first")
    model = AutoModelForCausalLM.from_pretrained(workspace / "outputs" / "first")
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=2048,
        )  # fmt: skip
    )
    input_ids = tokenizer("The history of", return_tensors="pt").input_ids
    return {"torch": torch, "model": model, "calm": model, "tokenizer": tokenizer, "llama": llama,
            "documents": documents(3, skip=50), "input_ids": input_ids}  # fmt: skip


# --------------------------------------------------------------------------------------------------- shell commands


class _Parsed(Exception):
    """Raised once a script's parser accepted its arguments (PARSE_ONLY)."""


@contextlib.contextmanager
def stop_after_parsing():
    """Let a script parse its arguments (argparse, or HfArgumentParser into its dataclasses, which validates them),
    then stop it."""
    import argparse

    parse_args, into_dataclasses = argparse.ArgumentParser.parse_args, HfArgumentParser.parse_args_into_dataclasses

    def parsed_args(self, *args, **kwargs):
        raise _Parsed(parse_args(self, *args, **kwargs))

    def parsed_dataclasses(self, *args, **kwargs):
        raise _Parsed(into_dataclasses(self, *args, **kwargs))

    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", parsed_args),
        mock.patch.object(HfArgumentParser, "parse_args_into_dataclasses", parsed_dataclasses),
    ):
        yield


def script_main(script: str):
    """The `main(argv)` of a repository script (examples/ is on sys.path, as `python examples/x.py` makes it)."""
    path = REPO_ROOT / script
    assert path.is_file(), f"no script {script}"
    if script.startswith("examples/"):
        return importlib.import_module(path.stem).main
    spec = importlib.util.spec_from_file_location(f"docs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def call_main(main, argv: list[str], parse_only: bool) -> None:
    if not parse_only:
        result = main(argv)
        assert result in (None, 0) or not isinstance(result, int), f"exit status {result}"
        return
    with stop_after_parsing(), pytest.raises(_Parsed):
        main(argv)


def run_python(words: list[str], record: list) -> None:
    """`python SCRIPT ARGS`, `python -m MODULE ARGS` or `calm ARGS`, in this process, at TINY sizes."""
    if words[0] in ("calm", ".venv/bin/calm"):
        key, main, argv = f"calm {words[1]}", calm_main, words[1:]
    elif words[1] == "-m":
        key, main, argv = words[2], importlib.import_module(words[2]).main, words[3:]
    else:
        key, main, argv = words[1], script_main(words[1]), words[2:]
    if key == "calm serve":  # serves until interrupted: parsed and the model checked (test_serve.py runs a server)
        with mock.patch("transformers_calm.serving.serve") as serve:
            calm_main(argv)
        assert serve.call_args.kwargs["model"] == argv[1], serve.call_args
        record.append((shlex.join(words), "parsed only: serves until interrupted; tests/test_serve.py serves"))
        return
    reason = PARSE_ONLY.get(key) or next((PARSE_ONLY[flag] for flag in argv if flag in PARSE_ONLY), None)
    if reason and key.startswith("examples/"):
        argv = [*argv, "--use_cpu"]
    call_main(main, [*argv, *([] if reason else TINY.get(key, []))], parse_only=bool(reason))
    record.append((shlex.join(words), f"parsed only: {reason}" if reason else "ran"))


LAUNCHED = {}  # the 2-process launches already run in this session (a launch costs seconds of process start)


def run_launcher(words: list[str], record: list) -> None:
    """`torchrun --nproc_per_node 2 SCRIPT ARGS` runs on 2 CPU processes; GPU and multi-machine launches (`accelerate
    launch`, `torchrun --nnodes`) have their files checked and the script's own arguments parsed."""
    script_index = next(i for i, word in enumerate(words) if word.endswith(".py"))
    script, argv = words[script_index], words[script_index + 1 :]
    for word in words[:script_index]:
        if word.endswith((".yaml", ".yml")):
            assert Path(word).is_file(), f"no accelerate config {word}"
    assert Path(script).is_file(), f"no script {script}"
    launch = (*words[:script_index], script)
    if words[0] == "torchrun" and "--nnodes" not in words and launch not in LAUNCHED:
        LAUNCHED[launch] = shlex.join(words)[:60]
        torchrun = Path(sys.executable).parent / "torchrun"
        argv = [*argv, *TINY[script]]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
        done = subprocess.run([str(torchrun), *words[1:script_index], script, *argv], capture_output=True,
                              text=True, env=env, timeout=300, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        record.append((shlex.join(words), "ran on 2 CPU processes"))
        return
    if argv != ["..."]:
        call_main(script_main(script), [*argv, "--use_cpu"], parse_only=True)
    # The same 2-process launch of the same script ran on an earlier page; the others need GPUs or machines.
    reason = f"this launch ran at {LAUNCHED[launch]}" if launch in LAUNCHED else "needs GPUs or machines"
    record.append((shlex.join(words), f"parsed only: {reason}; files checked"))


def check_pip_install(words: list[str], record: list) -> None:
    """`pip install REQUIREMENT...` and `pip install -e .`: this environment is what they make."""
    for word in words[2:]:
        if word == ".":
            location = Path(transformers_calm.__file__).resolve()
            assert REPO_ROOT in location.parents, f"transformers_calm is imported from {location}, not this clone"
        elif not word.startswith("-"):
            requirement = Requirement(word)
            installed = importlib.metadata.version(requirement.name).split("+")[0]
            assert requirement.specifier.contains(installed), f"{word}: this environment has {installed}"
    record.append((shlex.join(words), "checked against this environment"))


def run_hf(words: list[str], record: list) -> None:
    from huggingface_hub.cli.hf import main

    with mock.patch.object(sys, "argv", words), pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code in (0, None), f"{shlex.join(words)} exited with {exit_info.value.code}"
    record.append((shlex.join(words), "ran against the mocked Hub"))


def run_recipe(words: list[str], record: list) -> None:
    """`[NAME=value ...] bash examples/recipes/R.sh ARGS`: the recipe run with DRY_RUN=1 prints its commands (shell
    quoted, after `+`), and each is checked as a launch is (its files, the script's arguments parsed)."""
    env = {**os.environ, "DRY_RUN": "1"}
    while "=" in words[0]:
        name, value = words[0].split("=", 1)
        env[name], words = value, words[1:]
    assert words[0] == "bash" and words[1].startswith("examples/recipes/"), f"no rule for {shlex.join(words)}"
    done = subprocess.run(words, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    commands = [shlex.split(line[2:]) for line in done.stdout.splitlines() if line.startswith("+ ")]
    assert commands, f"{shlex.join(words)} printed no command: {done.stdout}"
    for command in commands:
        run_launcher(command, [])
    record.append((shlex.join(words), f"DRY_RUN: its {len(commands)} command(s) checked as launches"))


def run_command(words: list[str], record: list) -> None:
    program = words[0]
    if program == "bash" or "=" in program:
        run_recipe(words, record)
    elif program in ("python", "calm", ".venv/bin/calm"):
        run_python(words, record)
    elif program in ("torchrun", "accelerate"):
        run_launcher(words, record)
    elif program == "make":
        done = subprocess.run(["make", "-n", *words[1:]], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        record.append((shlex.join(words), "make -n: the target and its recipe exist"))
    elif program == "pip":
        check_pip_install(words, record)
    elif program == "hf":
        run_hf(words, record)
    elif program == "cp":
        subprocess.run(words, check=True)
        record.append((shlex.join(words), "ran"))
    else:
        raise AssertionError(f"no rule for a `{program}` command here: add one to run_command")


# ------------------------------------------------------------------------------------------------------------ tests


def page_blocks(page: str) -> list[Block]:
    blocks = code_blocks(page)
    if page == "README.md":  # the first steps have their own test, at their real size
        first_steps = README_TEXT.index("<!-- first-steps:")
        line = README_TEXT[:first_steps].count("\n") + 2
        blocks = [block for block in blocks if block.line != line]
    return blocks


README_TEXT = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def test_every_page_has_code_and_every_block_a_known_language():
    counts = {page: len(code_blocks(page)) for page in PAGES}
    assert counts["README.md"] >= 10 and sum(counts.values()) >= 30, counts
    for page in PAGES:
        for block in code_blocks(page):
            assert block.language in {"bash", "python", *NOT_CODE}, f"{block}: name the block's language"


@pytest.mark.slow  # trains tiny models and runs the documented scripts
# peft 0.21 calls the deprecated `is_gradient_checkpointing` of transformers 5.x when it wraps a model (finetune_lora).
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("page", [page for page in PAGES if any(b.language != "bibtex" for b in code_blocks(page))])
def test_the_page_runs(page, workspace, capsys):
    namespace, record = readers_objects(workspace), []
    with offline_hub() as hub:
        for block in page_blocks(page):
            try:
                if block.language == "python":
                    exec(compile(block.text, str(block), "exec"), namespace)  # noqa: S102 - the page's own code
                    record.append((block.text.splitlines()[0], "ran"))
                elif block.language == "bash":
                    for words in shell_commands(block.text):
                        run_command(words, record)
            except BaseException as error:
                raise AssertionError(f"{block} fails: {type(error).__name__}: {error}\n{block.text}") from error
    with capsys.disabled():
        print(f"\n{page}:\n" + "\n".join(f"  {how:<45} {command[:100]}" for command, how in record))
    if "push_to_hub" in "".join(b.text for b in code_blocks(page)):
        assert hub.commits, "push_to_hub uploaded nothing to the mocked Hub"


@pytest.mark.slow  # trains the tiny preset (about a minute on 2 CPU cores)
def test_the_readme_first_steps_give_a_first_generation_in_minutes(tmp_path):
    """The README's first steps, as written (after `make install`, which made this environment), with the console
    script installed beside this Python: a first generation within the README's few minutes."""
    block = README_TEXT.split("<!-- first-steps:", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = shell_commands(block)
    assert commands[0] == ["make", "install"]
    commands = [command for command in commands if command[0] == ".venv/bin/calm"]
    assert [command[1] for command in commands] == ["train", "generate"]
    calm = Path(sys.executable).parent / "calm"
    assert calm.is_file(), f"no `calm` console script beside {sys.executable}: pip install -e . installs it"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(min(2, os.cpu_count() or 1))}
    start = time.perf_counter()
    outputs = []
    for command in commands:
        command = [str(calm), *(str(tmp_path / "first") if part == "outputs/first" else part for part in command[1:])]
        if command[1] == "train":
            command[2] = str(REPO_ROOT / command[2])
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(done.stdout)
    seconds = time.perf_counter() - start
    assert outputs[1].startswith("The history of") and len(outputs[1].strip()) > len("The history of")
    assert seconds < 240, f"the first steps took {seconds:.0f} s after the install"
    print(f"first steps after make install: {seconds:.0f} s")
