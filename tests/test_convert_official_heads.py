"""Official flow-matching and diffusion CALM checkpoints, converted, reproduce the official tensors.

The fixtures (`tests/fixtures/official-tiny-heads/`, made by the official code with tiny random weights; its README
says how and lists every tensor) are read from the folder named by the environment variable
`CALM_OFFICIAL_HEADS_FIXTURES` (default: the repository's copy), so that these tests run unchanged on any fixture set
of the same layout (other K, GQA, head depth, latent size). Tolerances are the fixture README's: `atol=1e-5` for
hidden states and network outputs, `1e-4` for losses and samples, relative to the largest value (1e-5) for the
diffusion sampler, whose latents reach ~1e5 with random weights; integers exactly, float64 schedule tables to 1e-12.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transformers_calm import CalmForCausalLM
from transformers_calm.convert_official import convert_calm, load_official_state_dict, main
from transformers_calm.modeling_diffusion_head import CalmDiffusionHead
from transformers_calm.modeling_flow_head import CalmFlowHead, timestep_embedding

DEFAULT_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official-tiny-heads"
HEADS = {"flow": CalmFlowHead, "diffusion": CalmDiffusionHead}


@pytest.fixture(scope="module")
def fixtures_dir() -> Path:
    directory = Path(os.environ.get("CALM_OFFICIAL_HEADS_FIXTURES", DEFAULT_FIXTURES))
    if not (directory / "fixtures.safetensors").is_file():
        pytest.fail(f"No official head fixtures in {directory} (set CALM_OFFICIAL_HEADS_FIXTURES).", pytrace=False)
    return directory


@pytest.fixture(scope="module")
def tensors(fixtures_dir) -> dict[str, torch.Tensor]:
    return load_file(fixtures_dir / "fixtures.safetensors")


@pytest.fixture(scope="module")
def seeds(fixtures_dir) -> dict[str, int]:
    """The seeds the fixture set was made with (`meta.seeds`): a set made the same way with other seeds passes too."""
    return json.loads((fixtures_dir / "fixtures_meta.json").read_text())["meta"]["seeds"]


@pytest.fixture(scope="module", params=["flow", "diffusion"])
def converted(request, fixtures_dir) -> tuple[str, CalmForCausalLM]:
    return request.param, convert_calm(str(fixtures_dir / request.param), str(fixtures_dir / "autoencoder"))


def relative_close(actual, expected, rtol=1e-5):
    scale = expected.abs().max().clamp(min=1.0)
    assert (actual - expected).abs().max() / scale <= rtol


def test_config_and_head(converted, fixtures_dir):
    head, model = converted
    assert model.config.head_type == head and type(model.generative_head) is HEADS[head]
    official = load_official_state_dict(str(fixtures_dir / head))
    ours = model.state_dict()
    for name, tensor in official.items():
        if name.startswith("generative_head."):
            assert torch.equal(ours[name], tensor), name
        elif name.startswith("transformer.") and not name.endswith("inv_freq"):
            assert torch.equal(ours["model.backbone." + name[len("transformer.") :]], tensor), name


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.safetensors"])
def test_both_weight_formats_convert_to_the_same_model(fixtures_dir, tmp_path, weights):
    for head in HEADS:
        source = tmp_path / head
        source.mkdir()
        (source / "config.json").write_bytes((fixtures_dir / head / "config.json").read_bytes())
        (source / weights).symlink_to(fixtures_dir / head / weights)
        model = convert_calm(str(source), str(fixtures_dir / "autoencoder"))
        reference = convert_calm(str(fixtures_dir / head), str(fixtures_dir / "autoencoder"))
        for name, tensor in reference.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), name


def test_backbone_hidden_states(converted, tensors):
    head, model = converted
    ids = tensors["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model.model.embed_chunks(ids), tensors[f"{head}_inputs_embeds"], atol=1e-5, rtol=0)
        torch.testing.assert_close(model(ids).last_hidden_state, tensors[f"{head}_hidden_states"], atol=1e-5, rtol=0)


def test_network_and_time_embedding(converted, tensors):
    head, model = converted
    net = model.generative_head.net
    t = tensors[f"{head}_net_t"]
    t_net = (t * 1000).long() if head == "flow" else t  # the flow net embeds floor(1000 t) in float32
    if head == "flow":
        assert torch.equal(t_net, tensors["flow_net_t_int"])
    torch.testing.assert_close(timestep_embedding(t_net), tensors[f"{head}_net_t_freq"], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(net.time_embed(t_net), tensors[f"{head}_net_time_emb"], atol=1e-5, rtol=0)
        out = net(tensors[f"{head}_net_x"], t_net, tensors[f"{head}_net_c"])
    torch.testing.assert_close(out, tensors[f"{head}_net_out"], atol=1e-5, rtol=0)


def test_head_loss_for_given_draws(converted, tensors):
    head, model = converted
    target, z = tensors[f"{head}_loss_target"], tensors[f"{head}_loss_z"]
    with torch.no_grad():
        if head == "flow":
            per_sample = model.generative_head.sample_loss(target, z, tensors["flow_loss_t"], tensors["flow_loss_x0"])
        else:
            mse, vb = model.generative_head.sample_loss(
                target, z, tensors["diffusion_loss_t"], tensors["diffusion_loss_noise"]
            )
            torch.testing.assert_close(mse, tensors["diffusion_loss_mse"], atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(vb, tensors["diffusion_loss_vb"], atol=1e-4, rtol=1e-5)
            per_sample = mse + vb
    torch.testing.assert_close(per_sample, tensors[f"{head}_loss_per_sample"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(per_sample.mean(), tensors[f"{head}_loss"], atol=1e-4, rtol=1e-5)


def test_seeded_forward_loss_is_the_officials(converted, tensors, seeds):
    """The whole forward with labels, the official draws in the official order: posterior targets, then the head's."""
    head, model = converted
    seed = seeds[f"{head}_fwd"]
    ids = tensors["input_ids"]
    torch.manual_seed(seed)
    with torch.no_grad():
        loss = model.eval()(ids, labels=ids).loss
    torch.testing.assert_close(loss, tensors[f"{head}_fwd_eval_loss"], atol=1e-4, rtol=1e-5)


def sampling_noise(head, tensors):
    if head == "flow":
        return tensors["flow_sample_x0"]
    return torch.cat([tensors["diffusion_sample_x_T"][None], tensors["diffusion_sample_step_noise"]]).movedim(0, -2)


def test_sampler(converted, tensors):
    head, model = converted
    z = tensors[f"{head}_sample_z"]
    B, N, H = z.shape
    noise = sampling_noise(head, tensors)
    with torch.no_grad():
        latents = model.sample_latents(z.reshape(B * N, H), noise=noise).reshape(B, N, -1)
        tokens = model.decode_latents(latents).reshape(B, -1)
    expected = tensors[f"{head}_sample_out"]
    if head == "flow":
        torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-5)
    else:
        relative_close(latents, expected)
        with torch.no_grad():
            cold = model.generative_head(z.reshape(B * N, H), noise=noise, temperature=0.5).reshape(B, N, -1)
        relative_close(cold, tensors["diffusion_sample_temp05_out"])
    assert torch.equal(tokens, tensors[f"{head}_sample_decoded_argmax"])


def test_diffusion_schedules_and_steps(tensors, fixtures_dir):
    model = convert_calm(str(fixtures_dir / "diffusion"), str(fixtures_dir / "autoencoder"))
    head = model.generative_head
    train, sample = head.train_diffusion, head.sample_diffusion
    torch.testing.assert_close(train.betas, tensors["diffusion_train_betas"], atol=1e-12, rtol=0)
    torch.testing.assert_close(train.alphas_cumprod, tensors["diffusion_train_alphas_cumprod"], atol=1e-12, rtol=0)
    assert torch.equal(sample.timestep_map, tensors["diffusion_gen_timestep_map"])
    for ours, name in (
        (sample.betas, "betas"),
        (sample.alphas_cumprod, "alphas_cumprod"),
        (sample.posterior_variance, "posterior_variance"),
        (sample.posterior_log_variance_clipped, "posterior_log_variance_clipped"),
    ):
        torch.testing.assert_close(ours, tensors[f"diffusion_gen_{name}"], atol=1e-12, rtol=0)
    c = tensors["diffusion_sample_z"].reshape(-1, tensors["diffusion_sample_z"].shape[-1])
    for step, x_index in ((0, 99), (50, 49), (99, 0)):
        x = tensors["diffusion_sample_step_x"][x_index]
        t = torch.full((x.shape[0],), step, dtype=torch.long)
        with torch.no_grad():
            output = head.net(x, sample.timestep_map[t], c)
            mean, log_variance, pred_xstart = sample.p_mean_variance(output, x, t)
        relative_close(mean, tensors[f"diffusion_psample_s{step:02d}_mean"])
        relative_close(log_variance, tensors[f"diffusion_psample_s{step:02d}_log_variance"])
        relative_close(pred_xstart, tensors[f"diffusion_psample_s{step:02d}_pred_xstart"])


def test_seeded_generation_is_the_officials(converted, tensors, seeds):
    """`generate` at temperature 1 draws the head's noise from the global RNG as the official `generate` does, so the
    tokens are the official ones. One deliberate difference: the official loop keeps the rest of the chunk in which a
    row emits EOS and pads the later chunks; ours pads right after the EOS, where a token-level model ends."""
    head, model = converted
    torch.manual_seed(seeds[f"{head}_gen"])
    prompt = tensors[f"{head}_gen_prompt"]
    official = tensors[f"{head}_gen_output_ids"]
    out = model.generate(prompt, max_length=official.shape[1])
    expected = official.clone()
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    for row in range(expected.shape[0]):
        ends = (official[row, prompt.shape[1] :] == eos).nonzero()
        if len(ends):
            expected[row, prompt.shape[1] + int(ends[0]) + 1 :] = pad
    assert torch.equal(out, expected)


@pytest.mark.slow
def test_command_line_converts_a_flow_checkpoint(fixtures_dir, tmp_path):
    main(
        [
            "--autoencoder",
            str(fixtures_dir / "autoencoder"),
            "--calm",
            str(fixtures_dir / "flow"),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    model = CalmForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.head_type == "flow" and type(model.generative_head) is CalmFlowHead
