"""Publishing (hub.py): atomic `save_pretrained`, model cards, `save_pretrained` output as a complete Hub repository,
`push_to_hub` (with the public `huggingface_hub` API mocked: nothing leaves the machine), the opt-in of the model
classes, and loading what was uploaded, without the package (`trust_remote_code=True`), from a local folder and from a
hand-laid Hub cache.

Tiny models from `factories`, CPU, offline (`HF_HUB_OFFLINE=1`, set in conftest)."""

import ast
import json
import os
import sys
import textwrap
from pathlib import Path
from unittest import mock

import factories
import pytest
import torch
from common import mocked_hub
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from safetensors.torch import load as load_safetensors
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils.hub import PushToHubMixin

import transformers_calm
from transformers_calm import CalmAutoencoder, CalmForCausalLM, CalmModel
from transformers_calm.hub import CalmHubMixin, enable_hub_features
from transformers_calm.model_card import CITATION, TRANSFORMERS_PLACEHOLDER, create_model_card, merge_model_card
from transformers_calm.modeling_calm import CalmPreTrainedModel
from transformers_calm.modeling_calm_autoencoder import CalmAutoencoderPreTrainedModel

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = Path(transformers_calm.__file__).parent
K = 4
AE_KWARGS = {"vocab_size": 53, "patch_size": K, "latent_size": 6, "hidden_size": 16, "intermediate_size": 24}
# The language model's special tokens: no EOS, so that generate returns exactly max_new_tokens.
SPECIAL_TOKENS = {"pad_token_id": 0, "eos_token_id": None}
CALM_AUTO_MAP = {
    "AutoConfig": "configuration_calm.CalmConfig",
    "AutoModel": "modeling_calm.CalmModel",
    "AutoModelForCausalLM": "modeling_calm.CalmForCausalLM",
}
AE_AUTO_MAP = {
    "AutoConfig": "configuration_calm_autoencoder.CalmAutoencoderConfig",
    "AutoModel": "modeling_calm_autoencoder.CalmAutoencoder",
}
# The model code a repository needs: the configuration and modeling files and the modules modeling_calm.py imports
# relatively (transitively). No Hub code (hub.py, model_card.py): that is the package's, not the checkpoint's.
AE_MODULES = {
    "configuration_calm_autoencoder.py",
    "modeling_calm_autoencoder.py",
    "official_checkpoints.py",  # the official layout, loaded directly
    "screened_argmax.py",
}
CALM_MODULES = AE_MODULES | {
    "calm_loss.py",
    "candidate_decoding.py",
    "compat.py",
    "configuration_calm.py",
    "decoder_loss.py",
    "generation_calm.py",
    "generation_configuration_calm.py",
    "generation_steps.py",
    "input_compression.py",
    "modeling_calm.py",
    "modeling_diffusion_head.py",
    "modeling_energy_head.py",
    "modeling_flow_head.py",
    "pretrained_decoder.py",
    "sampling.py",
    "token_loss.py",
}
CALM_FILES = {"README.md", "config.json", "generation_config.json", "model.safetensors"} | CALM_MODULES
AE_FILES = {"README.md", "config.json", "model.safetensors"} | AE_MODULES
HUB_MODULES = {"hub.py", "model_card.py"}
OFFICIAL_CARDS = ("CALM-Autoencoder", "CALM-M", "CALM-L", "CALM-XL")
REVISION = "0123456789abcdef0123456789abcdef01234567"


def tiny_calm(seed=0) -> CalmForCausalLM:
    return factories.tiny_calm(seed, autoencoder={**AE_KWARGS, **SPECIAL_TOKENS})


def tiny_autoencoder(seed=0) -> CalmAutoencoder:
    return factories.tiny_autoencoder(seed, **AE_KWARGS)


def card_of(text: str | bytes) -> ModelCard:
    return ModelCard(text.decode() if isinstance(text, bytes) else text)


def write_files(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True)
    for name, content in files.items():
        (directory / name).write_bytes(content)
    return directory


_CHILD = textwrap.dedent(
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    calm_dir, ae_dir, hub_id, data_path, result_path = sys.argv[1:6]
    data = torch.load(data_path)
    result = {}
    for name, source in (("folder", calm_dir), ("hub_cache", hub_id)):
        lm = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True)
        torch.manual_seed(data["seed"])
        result[name] = {
            "classes": [type(o).__module__ + "." + type(o).__name__ for o in (lm, lm.config, lm.autoencoder)],
            "sequences": lm.generate(data["prompt"], max_new_tokens=8, do_sample=True),
        }
    ae = AutoModel.from_pretrained(ae_dir, trust_remote_code=True)
    with torch.no_grad():
        mean, log_std = ae.encode(data["ae_ids"])
        tokens = ae.decode(mean).argmax(-1)
    result["autoencoder"] = {
        "classes": [type(o).__module__ + "." + type(o).__name__ for o in (ae, ae.config)],
        "mean": mean,
        "tokens": tokens,
    }
    result["package_imported"] = any(m.partition(".")[0] == "transformers_calm" for m in sys.modules)
    torch.save(result, result_path)
    """
)


@pytest.fixture(scope="module")
def published(tmp_path_factory, run_without_package):
    """Push a tiny CALM and a tiny autoencoder with the Hub mocked; rebuild the uploaded folders, lay the CALM one out
    as a Hub cache entry of "org/calm-tiny", and load all three in one child process where the package is hidden."""
    root = tmp_path_factory.mktemp("hub")
    calm, autoencoder = tiny_calm(seed=1), tiny_autoencoder(seed=2)
    with mocked_hub() as hub:
        calm.push_to_hub("org/calm-tiny", commit_message="Add tiny CALM", tags=["my-tag"])
        autoencoder.push_to_hub("org/calm-tiny-autoencoder")
    commits = hub.commits
    calm_commit, ae_commit = commits
    calm_dir = write_files(root / "calm-tiny", calm_commit["files"])
    ae_dir = write_files(root / "calm-tiny-autoencoder", ae_commit["files"])
    cache = root / "hub-cache"
    write_files(cache / "models--org--calm-tiny" / "snapshots" / REVISION, calm_commit["files"])
    (cache / "models--org--calm-tiny" / "refs").mkdir()
    (cache / "models--org--calm-tiny" / "refs" / "main").write_text(REVISION)

    generator = torch.Generator().manual_seed(7)
    prompt = torch.randint(1, AE_KWARGS["vocab_size"], (2, 6), generator=generator)  # 6 is not a multiple of K
    ae_ids = torch.randint(1, AE_KWARGS["vocab_size"], (2, 3 * K), generator=generator)
    torch.save({"prompt": prompt, "ae_ids": ae_ids, "seed": 5}, root / "data.pt")
    run_without_package(
        _CHILD,
        [calm_dir, ae_dir, "org/calm-tiny", root / "data.pt", root / "result.pt"],
        cwd=root,
        HF_HUB_CACHE=str(cache),
        HF_MODULES_CACHE=str(root / "modules"),
        OMP_NUM_THREADS="1",
    )
    return {
        "calm": calm,
        "autoencoder": autoencoder,
        "commits": commits,
        "card_load_calls": hub.card_load.call_args_list,
        "calm_dir": calm_dir,
        "cache": cache,
        "prompt": prompt,
        "ae_ids": ae_ids,
        "seed": 5,
        "child": torch.load(root / "result.pt"),
    }


# --------------------------------------------------------------------------------------------------------------------
# save_pretrained: a complete Hub repository


def test_save_pretrained_writes_a_complete_repository_with_a_card(tmp_path):
    model = tiny_calm()
    model.save_pretrained(tmp_path / "calm-tiny")
    assert set(os.listdir(tmp_path / "calm-tiny")) == CALM_FILES
    assert os.listdir(tmp_path) == ["calm-tiny"]  # no temporary leftovers
    assert json.loads((tmp_path / "calm-tiny" / "config.json").read_text())["auto_map"] == CALM_AUTO_MAP

    card = ModelCard.load(tmp_path / "calm-tiny" / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["calm", "custom_code", "text-generation"]
    assert card.data.license is None  # only when asked for
    text = card.text
    assert text.startswith("\n# calm-tiny\n")
    assert f"| Tokens per step, K (`patch_size`) | {K} |" in text
    assert f"| Latent vector size, l (`latent_size`) | {AE_KWARGS['latent_size']} |" in text
    assert "2 layers, hidden size 32, intermediate size 48, 4 attention heads (2 key/value heads)" in text
    total, autoencoder = model.num_parameters(), model.autoencoder.num_parameters()
    assert f"| Parameters | {total:,} " in text and f"language model {total - autoencoder:,} " in text
    assert 'AutoModelForCausalLM.from_pretrained("calm-tiny", trust_remote_code=True)' in text
    assert CITATION in text


def test_save_pretrained_autoencoder_card(tmp_path):
    model = tiny_autoencoder()
    model.save_pretrained(tmp_path / "ae", model_card_kwargs={"results": {"reconstruction_accuracy": 0.99875}})
    assert set(os.listdir(tmp_path / "ae")) == AE_FILES
    card = ModelCard.load(tmp_path / "ae" / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag is None  # not a text generator
    assert card.data.tags == ["calm", "custom_code", "autoencoder"]
    assert f"| Parameters | {model.num_parameters():,} " in card.text
    assert 'AutoModel.from_pretrained("ae", trust_remote_code=True)' in card.text
    assert "| reconstruction_accuracy | 0.99875 |" in card.text


def test_save_pretrained_card_arguments(tmp_path):
    tiny_calm().save_pretrained(
        tmp_path / "out",
        model_card_kwargs={
            "repo_id": "org/calm-tiny",
            "license": "apache-2.0",
            "datasets": ["monology/pile-uncopyrighted"],
            "base_model": "org/calm-base",
            "tags": ["calm", "demo"],
            "results": {"brierlm": 5.7167, "eval_loss": 0.125},
        },
    )
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.license == "apache-2.0"
    assert card.data.datasets == ["monology/pile-uncopyrighted"]
    assert card.data.base_model == "org/calm-base"
    assert card.data.tags == ["calm", "custom_code", "text-generation", "demo"]
    assert card.text.startswith("\n# calm-tiny\n")  # named after the repository, not the folder
    assert 'from_pretrained("org/calm-tiny", trust_remote_code=True)' in card.text
    assert "## Evaluation results" in card.text
    assert "| brierlm | 5.7167 |" in card.text and "| eval_loss | 0.125 |" in card.text


def test_save_pretrained_never_overwrites_an_existing_card(tmp_path):
    directory = tmp_path / "calm"
    directory.mkdir()
    (directory / "README.md").write_text("# My own card\n")
    (directory / "config.json").write_text("{}")
    model = tiny_calm()
    model.save_pretrained(directory)
    assert (directory / "README.md").read_text() == "# My own card\n"
    assert set(os.listdir(directory)) == CALM_FILES
    assert json.loads((directory / "config.json").read_text())["model_type"] == "calm"  # the rest is replaced
    model.save_pretrained(directory)  # again, into a complete repository
    assert (directory / "README.md").read_text() == "# My own card\n"
    assert sorted(os.listdir(tmp_path)) == ["calm"]


def test_create_model_card_without_saving():
    model = tiny_calm()
    card = create_model_card(model, repo_id="org/x", license="other", license_name="my-license", language="en")
    assert card.data.license == "other" and card.data.license_name == "my-license" and card.data.language == "en"
    assert card.data.to_dict()["pipeline_tag"] == "text-generation"
    assert ModelCard(str(card)).data.to_dict() == card.data.to_dict()  # round-trips through the file format


# --------------------------------------------------------------------------------------------------------------------
# save_pretrained: atomic, into new and existing directories


def assert_same_outputs(model_a, model_b, input_ids):
    with torch.no_grad():
        out_a, out_b = model_a.eval()(input_ids), model_b.eval()(input_ids)
    for name in ("loss", "reconstruction_loss", "kl_loss", "logits", "latent_mean", "latent_log_std"):
        assert torch.equal(out_a[name], out_b[name]), name


def test_save_into_existing_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "trainer_state.json").write_text("{}")
    tiny_autoencoder(seed=0).save_pretrained(target)
    second = tiny_autoencoder(seed=1)
    second.save_pretrained(str(target) + os.sep)  # again, into the now populated directory
    assert (target / "trainer_state.json").read_text() == "{}"
    assert set(os.listdir(target)) == AE_FILES | {"trainer_state.json"}
    assert_same_outputs(second, AutoModel.from_pretrained(target), factories.random_ids(2, 16, AE_KWARGS["vocab_size"]))
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary directory left behind


def test_save_into_a_file_path_raises(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        tiny_autoencoder().save_pretrained(tmp_path / "file")


def test_failed_save_leaves_no_temporary_directory(tmp_path):
    with mock.patch.object(PreTrainedModel, "save_pretrained", side_effect=RuntimeError("disk full")):
        with pytest.raises(RuntimeError, match="disk full"):
            tiny_autoencoder().save_pretrained(tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("first_shard, second_shard", [(None, "8KB"), ("8KB", "20KB"), ("8KB", None)])
def test_resave_over_a_checkpoint_with_different_sharding(tmp_path, first_shard, second_shard):
    """Re-saving into a directory must give the same files as a fresh save: no stale weight files or shards that
    a loader could pick up instead of the new ones (a stale model.safetensors wins over a new sharded index)."""

    def save(model, directory, shard):
        model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))

    old, new = tiny_autoencoder(seed=0), tiny_autoencoder(seed=1)
    save(old, tmp_path / "reused", first_shard)
    save(new, tmp_path / "reused", second_shard)
    save(new, tmp_path / "fresh", second_shard)
    assert sorted(os.listdir(tmp_path / "reused")) == sorted(os.listdir(tmp_path / "fresh"))
    reloaded = AutoModel.from_pretrained(tmp_path / "reused")
    assert_same_outputs(new, reloaded, factories.random_ids(2, 16, AE_KWARGS["vocab_size"]))


def test_save_on_another_process_writes_no_card(tmp_path):
    with mocked_hub() as hub:
        tiny_autoencoder().save_pretrained(tmp_path / "ckpt", is_main_process=False, push_to_hub=True)
    assert "README.md" not in os.listdir(tmp_path / "ckpt")
    assert not hub.create_repo.called and not hub.commits  # only the main process uploads


# --------------------------------------------------------------------------------------------------------------------
# The opt-in: the modeling files hold no Hub code; the package's classes get it from hub.py


def absolute_imports(path: Path) -> set[str]:
    """Top-level names of every absolute import in a Python file (nested ones included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.partition(".")[0])
    return names


def relative_imports(path: Path) -> set[str]:
    """File names of the modules a Python file imports relatively, transitively."""
    return {os.path.basename(name) for name in get_relative_import_files(str(path))}


@pytest.mark.parametrize("name", sorted(CALM_MODULES))
def test_model_code_imports_only_torch_transformers_and_model_code(name):
    path = PACKAGE_DIR / name
    assert absolute_imports(path) - set(sys.stdlib_module_names) <= {"torch", "transformers"}
    assert relative_imports(path) <= CALM_MODULES  # never hub.py, model_card.py or the trainers


def test_saved_code_files_are_exactly_the_model_code(tmp_path):
    tiny_calm().save_pretrained(tmp_path / "calm")
    tiny_autoencoder().save_pretrained(tmp_path / "ae")
    for directory, top_modules in ((tmp_path / "calm", ("modeling_calm.py",)), (tmp_path / "ae", ())):
        code = {name for name in os.listdir(directory) if name.endswith(".py")}
        assert not code & HUB_MODULES
        modeling = {"modeling_calm_autoencoder.py", *top_modules}
        expected = (
            modeling
            | {"configuration_calm_autoencoder.py"}
            | set().union(*(relative_imports(PACKAGE_DIR / name) for name in modeling))
        )
        assert code == expected
    assert {name for name in os.listdir(tmp_path / "calm") if name.endswith(".py")} == CALM_MODULES
    assert {name for name in os.listdir(tmp_path / "ae") if name.endswith(".py")} == AE_MODULES


def test_no_private_transformers_method_is_overridden():
    assert "_upload_modified_files" not in vars(CalmHubMixin)
    # The mixin's own attributes are the two public methods (its helpers are module functions of hub.py).
    assert {name for name in vars(CalmHubMixin) if not name.startswith("__")} == {"save_pretrained", "push_to_hub"}
    hub_private = {name for name in vars(PushToHubMixin) if name.startswith("_") and not name.startswith("__")}
    assert "_upload_modified_files" in hub_private  # what the check below looks for
    for model_class in (CalmForCausalLM, CalmModel, CalmAutoencoder):
        mro = model_class.__mro__
        assert mro.index(CalmHubMixin) < mro.index(PreTrainedModel)
        ours = [cls for cls in mro if cls.__module__.startswith("transformers_calm")]
        assert mro[mro.index(PreTrainedModel) - 1] is CalmHubMixin
        for cls in ours:
            assert not set(vars(cls)) & hub_private, cls
        assert model_class.save_pretrained is CalmHubMixin.save_pretrained
        assert model_class.push_to_hub is CalmHubMixin.push_to_hub


def test_enable_hub_features_is_the_package_opt_in_and_idempotent():
    for base in (CalmAutoencoderPreTrainedModel, CalmPreTrainedModel):
        assert base.__bases__ == (CalmHubMixin, PreTrainedModel)
    enable_hub_features(CalmAutoencoderPreTrainedModel, CalmPreTrainedModel)  # again: nothing changes
    assert CalmPreTrainedModel.__bases__ == (CalmHubMixin, PreTrainedModel)

    class Plain(PreTrainedModel):
        pass

    class Sub(Plain):
        pass

    assert not issubclass(Sub, CalmHubMixin)
    enable_hub_features(Plain)
    assert Plain.__bases__ == (CalmHubMixin, PreTrainedModel)
    assert Sub.save_pretrained is CalmHubMixin.save_pretrained  # subclasses follow
    with pytest.raises(TypeError, match="not a PreTrainedModel subclass"):
        enable_hub_features(object)


# --------------------------------------------------------------------------------------------------------------------
# push_to_hub (mocked Hub): what is uploaded


@pytest.mark.slow  # `published` loads the uploads in a child process
def test_push_to_hub_uploads_the_repository_with_our_card(published):
    assert len(published["commits"]) == 2
    commit = published["commits"][0]
    assert commit["repo_id"] == "org/calm-tiny"
    assert commit["commit_message"] == "Add tiny CALM"
    assert set(commit["files"]) == CALM_FILES
    assert published["card_load_calls"][0].args[0] == "org/calm-tiny"  # we looked for an existing card

    config = json.loads(commit["files"]["config.json"])
    assert config["auto_map"] == CALM_AUTO_MAP
    assert config["model_type"] == "calm" and config["autoencoder_config"]["model_type"] == "calm_autoencoder"
    assert json.loads(commit["files"]["generation_config.json"])["do_sample"] is True
    for name in CALM_MODULES:
        assert commit["files"][name] == (REPO_ROOT / "src" / "transformers_calm" / name).read_bytes(), name
    weights = load_safetensors(commit["files"]["model.safetensors"])
    state = published["calm"].state_dict()
    assert weights and all(torch.equal(tensor, state[name]) for name, tensor in weights.items())

    card = card_of(commit["files"]["README.md"])
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["calm", "custom_code", "text-generation", "my-tag"]  # with the push_to_hub tags
    assert TRANSFORMERS_PLACEHOLDER not in card.text  # not transformers' generic card
    assert card.text.startswith("\n# calm-tiny\n")
    assert 'AutoModelForCausalLM.from_pretrained("org/calm-tiny", trust_remote_code=True)' in card.text
    assert CITATION in card.text


@pytest.mark.slow  # `published` loads the uploads in a child process
def test_push_to_hub_autoencoder(published):
    commit = published["commits"][1]
    assert commit["repo_id"] == "org/calm-tiny-autoencoder"
    assert commit["commit_message"] == "Upload CalmAutoencoder"  # transformers' default
    assert set(commit["files"]) == AE_FILES
    assert json.loads(commit["files"]["config.json"])["auto_map"] == AE_AUTO_MAP
    card = card_of(commit["files"]["README.md"])
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["calm", "custom_code", "autoencoder"]
    assert 'AutoModel.from_pretrained("org/calm-tiny-autoencoder", trust_remote_code=True)' in card.text


def test_push_to_hub_keeps_the_card_a_repository_already_has():
    remote = card_of("---\nlicense: mit\ntags:\n- mine\n---\n\n# Hand-written\n\nKeep this text.\n")
    with mocked_hub(remote_card=remote) as hub:
        tiny_autoencoder().push_to_hub("org/ae")
    card = card_of(hub.commits[0]["files"]["README.md"])
    assert card.text == "\n# Hand-written\n\nKeep this text.\n"
    assert card.data.license == "mit"
    assert card.data.library_name == "transformers"  # our metadata completes it
    assert card.data.tags == ["mine", "calm", "custom_code", "autoencoder"]


def test_merge_model_card_fills_only_missing_metadata():
    generated = create_model_card(
        tiny_calm(), license="other", license_name="calm-license", license_link="https://example.com/license"
    )
    merged = merge_model_card(card_of("---\nlicense: mit\n---\n\n# Mine\n"), generated)
    assert merged.data.to_dict() == {
        "license": "mit",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["calm", "custom_code", "text-generation"],
    }
    assert "license_name" not in str(merged)
    merged = merge_model_card(card_of("---\ntags: [a]\n---\n\n# Mine\n"), generated)
    assert (merged.data.license, merged.data.license_name) == ("other", "calm-license")
    assert merged.data.license_link == "https://example.com/license"
    assert merged.text == "\n# Mine\n" and merged.data.tags == ["a", "calm", "custom_code", "text-generation"]
    assert str(merge_model_card(None, generated)) == str(generated)


def test_save_pretrained_with_push_to_hub(tmp_path):
    model = tiny_calm()
    with mocked_hub() as hub:
        model.save_pretrained(
            tmp_path / "local-name", push_to_hub=True, repo_id="org/pushed", model_card_kwargs={"license": "mit"}
        )
    (commit,) = hub.commits
    assert commit["repo_id"] == "org/pushed"
    assert set(commit["files"]) == CALM_FILES
    card = card_of(commit["files"]["README.md"])
    assert card.data.license == "mit" and "calm" in card.data.tags
    assert TRANSFORMERS_PLACEHOLDER not in card.text
    # The local folder is the same repository, card included.
    assert set(os.listdir(tmp_path / "local-name")) == CALM_FILES
    assert (tmp_path / "local-name" / "README.md").read_bytes() == commit["files"]["README.md"]


def test_push_to_hub_uploads_a_loadable_checkpoint(tmp_path):
    model = tiny_autoencoder()
    with mocked_hub() as hub:
        commit_info = model.push_to_hub("org/calm-autoencoder")
    (commit,) = hub.commits
    assert commit_info.oid == "a" * 40  # the commit made is returned
    assert set(commit["files"]) == AE_FILES
    assert json.loads(commit["files"]["config.json"])["model_type"] == "calm_autoencoder"
    write_files(tmp_path / "uploaded", commit["files"])
    reloaded = AutoModel.from_pretrained(tmp_path / "uploaded")
    assert type(reloaded) is CalmAutoencoder
    assert_same_outputs(model, reloaded, factories.random_ids(2, 16, AE_KWARGS["vocab_size"]))


def test_push_to_hub_arguments_reach_the_hub_api():
    model = tiny_autoencoder()
    model.add_model_tags(["from-model"])
    with mocked_hub() as hub:
        model.push_to_hub(
            "org/ae",
            commit_message="msg",
            commit_description="desc",
            private=True,
            token="hf_x",
            revision="dev",
            create_pr=True,
            tags="extra",
        )
    assert hub.create_repo.call_args.args[1] == "org/ae"
    assert hub.create_repo.call_args.kwargs == {"private": True, "token": "hf_x", "exist_ok": True}
    assert hub.card_load.call_args.args == ("org/ae",) and hub.card_load.call_args.kwargs["token"] == "hf_x"
    assert hub.create_branch.call_args.args[1] == "org/ae"
    assert hub.create_branch.call_args.kwargs == {"branch": "dev", "token": "hf_x", "exist_ok": True}
    (commit,) = hub.commits
    assert commit["commit_message"] == "msg" and commit["commit_description"] == "desc"
    assert (commit["token"], commit["revision"], commit["create_pr"]) == ("hf_x", "dev", True)
    assert card_of(commit["files"]["README.md"]).data.tags == [
        "calm",
        "custom_code",
        "autoencoder",
        "from-model",
        "extra",
    ]
    assert model.model_tags == ["from-model"]  # the push's tags are not added to the model


def test_push_to_hub_a_pull_request_branch_is_not_created():
    with mocked_hub() as hub:
        tiny_autoencoder().push_to_hub("org/ae", revision="refs/pr/1")
    assert not hub.create_branch.called and hub.commits[0]["revision"] == "refs/pr/1"


def repository_not_found():
    return RepositoryNotFoundError("no repository", response=mock.Mock(status_code=404, headers={}))


@pytest.mark.parametrize("make_error", [lambda: EntryNotFoundError("no README"), repository_not_found])
def test_push_to_hub_without_a_remote_card_uploads_ours(make_error):
    with mocked_hub(card_error=make_error()) as hub:
        tiny_calm().push_to_hub("org/new")
    card = card_of(hub.commits[0]["files"]["README.md"])
    assert card.text.startswith("\n# new\n") and card.data.pipeline_tag == "text-generation"


def test_push_to_hub_replaces_the_transformers_placeholder():
    placeholder = card_of(
        f"---\nlibrary_name: transformers\ntags: [old]\n---\n\n# Model\n\n{TRANSFORMERS_PLACEHOLDER}\n"
    )
    with mocked_hub(remote_card=placeholder) as hub:
        tiny_autoencoder().push_to_hub("org/ae")
    card = card_of(hub.commits[0]["files"]["README.md"])
    assert TRANSFORMERS_PLACEHOLDER not in card.text and card.text.startswith("\n# ae\n")
    assert card.data.tags == ["calm", "custom_code", "autoencoder", "old"]


def test_save_pretrained_push_to_hub_uses_the_directory_name_as_repo_id(tmp_path):
    """`save_pretrained(dir, push_to_hub=True)` defaults repo_id to the directory name; the atomic save must not turn
    it into the name of its temporary directory. The repository is created before anything is saved."""

    class Stop(Exception):
        pass

    with mock.patch.object(HfApi, "create_repo", autospec=True, side_effect=Stop) as create_repo:
        with pytest.raises(Stop):
            tiny_autoencoder().save_pretrained(tmp_path / "my-autoencoder", push_to_hub=True)
    assert create_repo.call_args.args[1] == "my-autoencoder"
    assert os.listdir(tmp_path) == []


def test_save_pretrained_with_push_to_hub_into_an_existing_directory(tmp_path):
    """Only what this save writes is uploaded (not the other files of a Trainer output_dir), with our card; the
    user's README.md stays in the directory."""
    directory = tmp_path / "out"
    directory.mkdir()
    (directory / "README.md").write_text("# My own card\n")
    (directory / "trainer_state.json").write_text("{}")
    with mocked_hub() as hub:
        tiny_autoencoder().save_pretrained(directory, push_to_hub=True, repo_id="org/ae", commit_message="Save")
    (commit,) = hub.commits
    assert commit["repo_id"] == "org/ae" and commit["commit_message"] == "Save"
    assert set(commit["files"]) == AE_FILES
    card = card_of(commit["files"]["README.md"])
    assert card.text.startswith("\n# ae\n") and "calm" in card.data.tags
    assert (directory / "README.md").read_text() == "# My own card\n"
    assert set(os.listdir(directory)) == AE_FILES | {"trainer_state.json"}


# --------------------------------------------------------------------------------------------------------------------
# Loading what was uploaded


@pytest.mark.slow  # `published` loads the uploads in a child process
def test_uploaded_calm_loads_and_generates_without_the_package(published):
    child = published["child"]
    assert not child["package_imported"]
    lm_class, config_class, ae_class = child["folder"]["classes"]
    assert lm_class.startswith("transformers_modules.") and lm_class.endswith(".modeling_calm.CalmForCausalLM")
    assert config_class.endswith(".configuration_calm.CalmConfig")
    assert ae_class.endswith(".modeling_calm_autoencoder.CalmAutoencoder")
    prompt = published["prompt"]
    sequences = child["folder"]["sequences"]
    assert sequences.shape == (prompt.shape[0], prompt.shape[1] + 8)
    assert torch.equal(sequences[:, : prompt.shape[1]], prompt)
    torch.manual_seed(published["seed"])
    expected = published["calm"].generate(prompt, max_new_tokens=8, do_sample=True)
    assert torch.equal(sequences, expected)  # same weights, same code, same random draws


@pytest.mark.slow  # `published` loads the uploads in a child process
def test_uploaded_autoencoder_loads_without_the_package(published):
    child = published["child"]["autoencoder"]
    assert child["classes"][0].startswith("transformers_modules.")
    assert child["classes"][0].endswith(".modeling_calm_autoencoder.CalmAutoencoder")
    assert child["classes"][1].endswith(".configuration_calm_autoencoder.CalmAutoencoderConfig")
    with torch.no_grad():
        mean, _ = published["autoencoder"].encode(published["ae_ids"])
        tokens = published["autoencoder"].decode(mean).argmax(-1)
    torch.testing.assert_close(child["mean"], mean, atol=1e-6, rtol=0)
    assert torch.equal(child["tokens"], tokens)


@pytest.mark.slow  # `published` loads the uploads in a child process
def test_hub_id_from_the_cache_without_the_package(published):
    child = published["child"]["hub_cache"]
    assert child["classes"][0].startswith("transformers_modules.org.")
    assert child["classes"][0].endswith(".modeling_calm.CalmForCausalLM")
    assert torch.equal(child["sequences"], published["child"]["folder"]["sequences"])


@pytest.mark.slow  # `published` loads the uploads in a child process
def test_hub_id_from_the_cache_with_the_package(published):
    model = AutoModelForCausalLM.from_pretrained("org/calm-tiny", cache_dir=published["cache"])
    assert type(model) is CalmForCausalLM
    state = published["calm"].state_dict()
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())
    base = AutoModel.from_pretrained("org/calm-tiny", cache_dir=published["cache"])
    assert type(base).__name__ == "CalmModel" and type(base).__module__ == "transformers_calm.modeling_calm"


# --------------------------------------------------------------------------------------------------------------------
# The model cards of the official checkpoints (model_cards/)


def test_model_cards_folder_has_every_official_checkpoint():
    assert sorted(path.stem for path in (REPO_ROOT / "model_cards").glob("*.md")) == sorted(OFFICIAL_CARDS)


@pytest.mark.parametrize("name", OFFICIAL_CARDS)
def test_official_model_card(name):
    card = ModelCard.load(REPO_ROOT / "model_cards" / f"{name}.md")
    data = card.data
    assert data.library_name == "transformers"
    assert data.license
    assert {"calm", "custom_code"} <= set(data.tags)
    assert data.datasets == ["monology/pile-uncopyrighted"]
    assert data.base_model == f"cccczshao/{name}"
    if name == "CALM-Autoencoder":
        assert data.pipeline_tag is None
        assert "AutoModel.from_pretrained(" in card.text
    else:
        assert data.pipeline_tag == "text-generation"
        assert "text-generation" in data.tags
        assert "AutoModelForCausalLM.from_pretrained(" in card.text
        assert "temperature=" in card.text
        assert "examples/evaluate_brierlm.py" in card.text
    assert "python -m transformers_calm.convert_official" in card.text
    assert "trust_remote_code=True" in card.text
    assert "reported by the authors" in card.text.lower()  # the paper's figures are labelled as such
    assert CITATION in card.text
    assert "## Limitations" in card.text


def test_readme_cites_the_paper_like_the_cards():
    assert CITATION in (REPO_ROOT / "README.md").read_text()
