"""Benchmark: CALM generation (K tokens per backbone step) against a Llama with the same backbone.

Both models are random-initialised with identical backbone dimensions (hidden size, layers, heads, intermediate
size, vocabulary) and run in the same dtype with the same attention implementation (SDPA): float32 on CPU, bf16 on
GPU. The Llama (`LlamaForCausalLM`) generates through transformers' own `generate` (KV cache, multinomial sampling at
temperature 1, no top-k / top-p); CALM through `CalmForCausalLM.generate` (one head sample per chunk at T = 1), and
in a separate row with the batch approximation of temperature sampling (T = 1/2, N = `--num-candidates`). EOS is
disabled on both, and the script checks that every row got exactly `--new-tokens` new tokens.

    python benchmarks/bench_generate.py                      # prompt 128, 256 new tokens, batch 1 and 32
    python benchmarks/bench_generate.py --preset calm-m      # the paper's CALM-M backbone and Llama-3 vocabulary
    python benchmarks/bench_generate.py --device cuda        # bf16 + SDPA
    python benchmarks/bench_generate.py --quick              # tiny model, a few steps (used by the tests)
    python benchmarks/bench_generate.py --compile            # both models: static cache + torch.compile'd steps

`--cache static` gives both models transformers' `StaticCache`; `--compile` adds a `compile_config` (implying the static
cache), with which both `generate`s compile their decoding step the way transformers does for a Llama
(`mode="reduce-overhead"`, CUDA graphs, on GPU; inductor's default mode on CPU, where transformers compiles only when
told: `compile_config._compile_all_devices = True`). The prefill stays eager in both. Compiled CALM rows draw from the
global RNG, as the Llama does: a `torch.Generator` would break the compiled graph at each draw.

Prints, per batch size, the median seconds of a whole `generate` call (prefill included; the rows take turns), new
tokens per second, the speed-up over the Llama, and the FLOP ratio (Llama FLOPs / CALM FLOPs of the same call,
counted with torch's FlopCounterMode): the speed-up if time followed the arithmetic. A measured speed-up far below it
points at overhead; above it, at a memory- or launch-bound baseline. Then CALM's time split between backbone
(prefill and steps), energy head, decoder
(autoencoder decoder and argmax), sampler (the rest of choosing a chunk: candidate counting, the pick) and the
generate loop's own work. The split comes from a separate, instrumented run (timers around each part, with a device
synchronisation on GPU), so that the instrumentation does not slow the timed runs. Last, how often two head samples
decode to the same chunk (2,000 samples at the prompt's last position): what the exact sampler would cost at T = 1/2
on this model (`chunk_collision`).
"""

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM

from transformers_calm import CalmConfig, CalmForCausalLM

# Backbone sizes. The autoencoder (width 512), latent size (128) and head (4 blocks) are the official ones in both.
PRESETS = {
    # The default: a backbone small enough for a CPU run of a few minutes.
    "small": {"hidden_size": 512, "intermediate_size": 1376, "num_layers": 8, "num_heads": 8, "vocab_size": 32000},
    # The paper's CALM-M backbone (371.7M parameters without the autoencoder) and vocabulary (Llama-3 + [PAD]).
    "calm-m": {"hidden_size": 1024, "intermediate_size": 2752, "num_layers": 16, "num_heads": 16, "vocab_size": 128257},
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Backbone and autoencoder sizes, shared with bench_train.py; call `apply_preset` on the parsed arguments."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small", help="backbone sizes (default: small)")
    parser.add_argument("--hidden-size", type=int, default=None, help="overrides the preset")
    parser.add_argument("--intermediate-size", type=int, default=None, help="overrides the preset")
    parser.add_argument("--num-layers", type=int, default=None, help="overrides the preset")
    parser.add_argument("--num-heads", type=int, default=None, help="overrides the preset")
    parser.add_argument("--num-kv-heads", type=int, default=None, help="defaults to --num-heads")
    parser.add_argument("--vocab-size", type=int, default=None, help="overrides the preset")
    parser.add_argument("--patch-size", type=int, default=4, help="K")
    parser.add_argument("--latent-size", type=int, default=128)
    parser.add_argument("--num-mlp-layers", type=int, default=4, help="energy head blocks")
    parser.add_argument("--ae-hidden-size", type=int, default=512, help="autoencoder width (the official one: 512)")
    parser.add_argument("--ae-intermediate-size", type=int, default=1280)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: bf16 on GPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)


QUICK_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": None,
    "vocab_size": 512,
    "latent_size": 16,
    "num_mlp_layers": 2,
    "ae_hidden_size": 64,
    "ae_intermediate_size": 128,
}


def apply_preset(args: argparse.Namespace) -> None:
    """Fill the backbone sizes not given on the command line from `--preset`."""
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def count_flops(function) -> int:
    """Floating-point operations of the matrix products and attention in `function()` (torch's FlopCounterMode:
    2 per multiply-add; element-wise work is not counted)."""
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def millions(module: nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f}"


def resolve_dtype(args, device: torch.device) -> torch.dtype:
    if args.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, args.dtype)


def build_models(args, device: torch.device, dtype: torch.dtype, max_tokens: int) -> tuple[nn.Module, nn.Module]:
    """`(calm, llama)`, random-initialised, same backbone dimensions, SDPA, EOS disabled, in eval mode."""
    backbone = {
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads or args.num_heads,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": None,  # EOS disabled: both must produce every requested token
        "pad_token_id": None,
    }
    torch.manual_seed(args.seed)
    # The same backbone config for both; CALM's positions count chunks.
    calm_config = CalmConfig(
        backbone_config=LlamaConfig(**backbone, max_position_embeddings=-(-max_tokens // args.patch_size)),
        autoencoder_config={
            "vocab_size": args.vocab_size,
            "patch_size": args.patch_size,
            "latent_size": args.latent_size,
            "hidden_size": args.ae_hidden_size,
            "intermediate_size": args.ae_intermediate_size,
        },
        num_mlp_layers=args.num_mlp_layers,
    )
    calm = CalmForCausalLM._from_config(calm_config, attn_implementation="sdpa")
    # The head's last layer starts at zero (every sample the same latent); a trained head's samples differ, and
    # so should the candidates that the temperature sampler counts.
    nn.init.normal_(calm.generative_head.final_layer.linears[-1].weight, std=0.02)
    llama_config = LlamaConfig(**backbone, max_position_embeddings=max_tokens)
    llama = LlamaForCausalLM._from_config(llama_config, attn_implementation="sdpa")
    for model in (calm, llama):
        model.to(device=device, dtype=dtype).eval()
        model.generation_config.eos_token_id = None
    implementations = {calm.model.backbone.config._attn_implementation, llama.config._attn_implementation}
    assert implementations == {"sdpa"}, implementations
    return calm, llama


def generate_options(cache: str, compile: bool, device: torch.device) -> dict:
    """The `generate` keyword arguments of `--cache` and `--compile`, the same for both models."""
    if compile and cache != "static":
        raise SystemExit("--compile needs --cache static (transformers compiles decoding steps on a static cache).")
    if cache == "dynamic":
        return {}
    options = {"cache_implementation": "static"}
    if compile:
        config = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else "default")
        config._compile_all_devices = True  # transformers compiles only on accelerators unless told to
        options["compile_config"] = config
    return options


def llama_generate(llama, input_ids, new_tokens: int, options=None):
    """transformers' `generate`: KV cache, plain multinomial sampling at T = 1 (no top-k, no top-p), no EOS."""
    return llama.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=0,
        **(options or {}),
    )


def calm_generate(
    calm, input_ids, new_tokens: int, temperature: float, num_candidates: int, generator=None, options=None
):
    return calm.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=True,
        temperature=temperature,
        num_candidates=num_candidates,
        max_new_tokens=new_tokens,
        eos_token_id=None,
        generator=generator,
        **(options or {}),
    )


@torch.no_grad()
def chunk_collision(calm, input_ids, draws: int, generator=None) -> dict:
    """How often two head samples at the prompt's last position decode to the same chunk: an estimate of
    sum_x P(x)^2, of which the exact sampler at T = 1/2 needs 2 / sum_x P(x)^2 draws per chunk on average (paper,
    Theorem 2). From `draws` samples (pairs counted without repetition)."""
    hidden = calm.model(input_ids=input_ids[:1]).last_hidden_state[:, -1]
    latents = calm.sample_latents(hidden, num_samples=draws, generator=generator)  # (draws, 1, latent)
    chunks = calm.autoencoder.decode_token_ids(latents).reshape(draws, -1)
    _, counts = torch.unique(chunks, dim=0, return_counts=True)
    collision = float((counts * (counts - 1)).sum()) / (draws * (draws - 1))
    return {"draws": draws, "distinct_chunks": len(counts), "collision_probability": collision}


def timed_runs(function, repeats: int, synchronize) -> tuple[float, torch.Tensor]:
    """Median seconds of `repeats` calls, and the last output."""
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        output = function()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), output


class RegionTimer:
    """Seconds spent in modules and methods of a CALM model during `generate`, measured with forward hooks and
    wrapped methods (synchronising the device around each region, so GPU time lands in the right region)."""

    def __init__(self, calm, synchronize):
        self.calm = calm
        self.synchronize = synchronize
        self.seconds = defaultdict(float)
        self._starts = {}
        self._handles = []
        self._wrapped = []
        self._depth = defaultdict(int)

    def _pre(self, name):
        def hook(*_):
            self.synchronize()
            self._starts[name] = time.perf_counter()

        return hook

    def _post(self, name):
        def hook(*_):
            self.synchronize()
            self.seconds[name] += time.perf_counter() - self._starts.pop(name)

        return hook

    def _wrap(self, name, owner, method_name):
        """Time `owner.method_name` as region `name`; calls nested in another call of the same region (the
        decoder's `token_states` calling its `chunk_states`) count once."""
        original = getattr(owner, method_name)

        def wrapped(*args, **kwargs):
            self._depth[name] += 1
            if self._depth[name] == 1:
                self._pre(name)()
            try:
                return original(*args, **kwargs)
            finally:
                self._depth[name] -= 1
                if self._depth[name] == 0:
                    self._post(name)()

        setattr(owner, method_name, wrapped)  # an instance attribute shadows the method
        self._wrapped.append((owner, method_name))

    def __enter__(self):
        for name, module in (("backbone", self.calm.model), ("head", self.calm.generative_head)):
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))
        # The decoder's entry points: every candidate's tokens at T = 1 and on accelerators, the per-chunk half, one
        # token per candidate and the argmax over the vocabulary when the temperature sampler reads tokens lazily.
        decoder = self.calm.autoencoder.decoder
        for method_name in ("token_states", "chunk_states", "position_states", "argmax_token_ids"):
            self._wrap("decoder", decoder, method_name)
        self._wrap("choose_chunk", self.calm, "sample_next_chunk")
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        for owner, method_name in self._wrapped:
            delattr(owner, method_name)

    def split(self, total: float) -> dict[str, float]:
        """Fractions of `total`: backbone, head, decoder, sampler (choosing a chunk minus head and decoder), other."""
        s = self.seconds
        parts = {
            "backbone": s["backbone"],
            "head": s["head"],
            "decoder": s["decoder"],
            "sampler": s["choose_chunk"] - s["head"] - s["decoder"],
        }
        parts["other"] = total - sum(parts.values())
        return {name: value / total for name, value in parts.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--num-candidates", type=int, default=200, help="N of the batch-approximate sampler row")
    parser.add_argument("--approx-temperature", type=float, default=0.5)
    parser.add_argument(
        "--approx-batch-sizes",
        type=int,
        nargs="*",
        default=None,
        help="batch sizes of the N-candidate row (default: all; it decodes N * batch latents per step)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median), rows taking turns")
    parser.add_argument("--quick", action="store_true", help="tiny model, short prompt, a few steps")
    parser.add_argument("--cache", choices=["dynamic", "static"], default=None, help="default: static with --compile")
    parser.add_argument("--compile", action="store_true", help="compiled decoding steps, both models")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    args.cache = args.cache or ("static" if args.compile else "dynamic")
    if args.quick:
        for name, value in QUICK_SIZES.items():
            setattr(args, name, value)
        args.prompt_length, args.new_tokens, args.batch_sizes = 16, 16, [1, 2]
        args.num_candidates, args.repeats, args.approx_batch_sizes = 8, 1, None
    apply_preset(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = resolve_dtype(args, device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    approx_batch_sizes = args.batch_sizes if args.approx_batch_sizes is None else args.approx_batch_sizes

    calm, llama = build_models(args, device, dtype, args.prompt_length + args.new_tokens)
    print(
        f"backbone: hidden {args.hidden_size}, intermediate {args.intermediate_size}, {args.num_layers} layers, "
        f"{args.num_heads} heads, vocab {args.vocab_size}; CALM K={args.patch_size}, head {args.num_mlp_layers} "
        f"blocks, autoencoder width {args.ae_hidden_size}; parameters: CALM {millions(calm)}M (autoencoder "
        f"{millions(calm.autoencoder)}M), Llama {millions(llama)}M"
    )
    print(
        f"device {device.type}, {dtype}, SDPA, {torch.get_num_threads()} CPU thread(s); prompt {args.prompt_length}, "
        f"{args.new_tokens} new tokens, median of {args.repeats} run(s) after a warm-up; torch {torch.__version__}"
    )
    options = generate_options(args.cache, args.compile, device)
    if args.compile:
        # Each row and batch size is its own graph of each model's step (6 for CALM at three batch sizes): more than
        # torch's default of 8 recompiles per function would silently run the last rows eagerly.
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, 64)
    print(f"cache {args.cache}, {'compiled' if args.compile else 'eager'} decoding steps")
    generator = None if args.compile else torch.Generator(device=device).manual_seed(args.seed)
    torch.manual_seed(args.seed)
    rows = {
        "llama": lambda ids, n: llama_generate(llama, ids, n, options),
        "calm": lambda ids, n: calm_generate(calm, ids, n, 1.0, 1, generator, options),
        "calm-approx": lambda ids, n: calm_generate(
            calm, ids, n, args.approx_temperature, args.num_candidates, generator, options
        ),
    }
    labels = {
        "llama": "Llama, transformers generate (T=1)",
        "calm": f"CALM K={args.patch_size} (T=1)",
        "calm-approx": f"CALM K={args.patch_size} (T={args.approx_temperature:g}, N={args.num_candidates})",
    }
    # The work each row does, counted once at batch 1 (both models' FLOPs grow linearly with the batch): the
    # speed-up that time proportional to FLOPs would give, to set against the measured one.
    prompt = torch.randint(0, args.vocab_size, (1, args.prompt_length), device=device)
    with torch.compiler.set_stance("force_eager"):  # the same arithmetic, counted without compiling
        flops = {name: count_flops(lambda r=row: r(prompt, args.new_tokens)) for name, row in rows.items()}
    print(
        "FLOPs per new token (batch 1, prefill included): "
        + ", ".join(f"{name} {flops[name] / args.new_tokens / 1e6:.1f} MFLOP" for name in rows)
    )
    print(f"{'batch':>5} {'model':<40} {'seconds':>9} {'new tok/s':>10} {'speed-up':>9} {'FLOP ratio':>11}")
    results, splits = {}, {}
    for batch_size in args.batch_sizes:
        input_ids = torch.randint(0, args.vocab_size, (batch_size, args.prompt_length), device=device)
        names = [name for name in rows if name != "calm-approx" or batch_size in approx_batch_sizes]
        # Warm-up (compiling, with --compile: at the timed length, since the static cache's length is a graph shape).
        warm_up_tokens = args.new_tokens if args.compile else min(args.new_tokens, 4 * args.patch_size)
        for name in names:
            rows[name](input_ids, warm_up_tokens)
        # Rows take turns within every repeat, so that a machine slowing down or speeding up (shared hosts, clock
        # changes) affects them alike and leaves the ratios alone.
        times = defaultdict(list)
        for _ in range(args.repeats):
            for name in names:
                seconds, output = timed_runs(lambda r=rows[name], i=input_ids: r(i, args.new_tokens), 1, synchronize)
                times[name].append(seconds)
                # EOS is disabled: every row must have exactly the requested number of new tokens.
                assert output.shape == (batch_size, args.prompt_length + args.new_tokens), (name, tuple(output.shape))
                assert torch.equal(output[:, : args.prompt_length], input_ids), name
        for name in names:
            seconds = results[batch_size, name] = statistics.median(times[name])
            speedup = results[batch_size, "llama"] / seconds
            tokens_per_second = batch_size * args.new_tokens / seconds
            flop_ratio = flops["llama"] / flops[name]
            print(
                f"{batch_size:5d} {labels[name]:<40} {seconds:9.3f} {tokens_per_second:10.1f} {speedup:8.2f}x "
                f"{flop_ratio:10.2f}x"
            )
            if name != "llama" and not args.compile:  # hooks would break the compiled graph
                with torch.no_grad(), RegionTimer(calm, synchronize) as timer:
                    synchronize()
                    start = time.perf_counter()
                    rows[name](input_ids, args.new_tokens)
                    synchronize()
                    total = time.perf_counter() - start
                splits[batch_size, name] = timer.split(total)

    print("\nCALM time split (instrumented run; fractions of its generate call)")
    print(f"{'batch':>5} {'model':<40} {'backbone':>9} {'head':>7} {'decoder':>8} {'sampler':>8} {'other':>7}")
    for (batch_size, name), split in splits.items():
        print(
            f"{batch_size:5d} {labels[name]:<40} "
            + " ".join(f"{100 * split[part]:{w}.1f}%" for part, w in zip(split, (8, 6, 7, 7, 6), strict=True))
        )
    print()
    for (batch_size, name), seconds in results.items():
        tokens_per_second = batch_size * args.new_tokens / seconds
        print(f"tokens/s batch={batch_size} {name}: {tokens_per_second:.1f}")
        if name != "llama":
            print(f"speedup batch={batch_size} {name}: {results[batch_size, 'llama'] / seconds:.2f}")
    for name in rows:
        if name != "llama":
            print(f"flop ratio {name}: {flops['llama'] / flops[name]:.2f}")
    # What the exact sampler would cost at T = 1/2 on this model: it is cheap only where chunks collide often.
    collision = chunk_collision(calm, prompt, 200 if args.quick else 2000, generator)
    pairs = collision["draws"] * (collision["draws"] - 1) / 2
    if collision["collision_probability"]:
        estimate = (
            f"sum P^2 ~ {collision['collision_probability']:.3g}, so ~{2 / collision['collision_probability']:.3g}"
        )
    else:  # no two equal among the pairs: sum P^2 is of the order of 1 / pairs or below
        estimate = f"no two equal, sum P^2 below ~{1 / pairs:.1g}, so more than ~{2 * pairs:.1g}"
    print(
        f"chunk collision: {collision['distinct_chunks']} distinct chunks in {collision['draws']} head samples; "
        f"{estimate} draws per chunk for the exact sampler at T=1/2 (the batch approximation decodes N)"
    )
    if args.json:
        report = {
            "settings": {**vars(args), "device": device.type, "dtype": str(dtype), "torch": torch.__version__},
            "flops_per_call": flops,
            "rows": [
                {
                    "batch_size": batch_size,
                    "model": name,
                    "seconds": seconds,
                    "tokens_per_second": batch_size * args.new_tokens / seconds,
                    "speedup_over_llama": results[batch_size, "llama"] / seconds,
                }
                for (batch_size, name), seconds in results.items()
            ],
            "time_split": [{"batch_size": b, "model": n, **split} for (b, n), split in splits.items()],
            "chunk_collision": collision,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"-> {args.json}")


if __name__ == "__main__":
    main()
