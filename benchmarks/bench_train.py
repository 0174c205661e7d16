"""Benchmark: CALM training throughput against a Llama with the same backbone, same data and same batch.

Both models are random-initialised with identical backbone dimensions (see bench_generate.py for the sizes) and SDPA
attention, and train with the same loop: forward with `labels = input_ids`, backward, AdamW step. CALM's loss is
the energy loss (N = `num_samples` = 8 head samples, M = `num_targets` = 100 posterior targets); the Llama's is
the token cross-entropy. float32 on CPU; on GPU float32 weights under bf16 autocast (what `--bf16` does in
`Trainer`).

    python benchmarks/bench_train.py                   # batch 8 x 256 tokens
    python benchmarks/bench_train.py --preset calm-m   # the paper's CALM-M backbone and Llama-3 vocabulary
    python benchmarks/bench_train.py --device cuda
    python benchmarks/bench_train.py --quick           # tiny model, one step (used by the tests)
    python benchmarks/bench_train.py --compile         # both models under torch.compile (nn.Module.compile)

Prints the median step time and training tokens per second of both, the speed-up (Llama step / CALM step), the FLOP
ratio (forward and backward FLOPs counted with torch's FlopCounterMode: the speed-up if time followed the
arithmetic), and the share of a CALM step spent in the energy head and loss: the energy loss (autoencoder posterior
of the targets, N head samples, energy score) forward and backward, timed on its own on the backbone's detached
hidden states, divided by the whole step, in time and in FLOPs; the autoencoder's part of it is printed beside.
With `--compile` both models' forward passes (CALM's energy loss included) run compiled, the warm-up steps compile
them, FLOPs are counted eagerly (the same arithmetic), and the head's share is that of the eager head against the
compiled step. `--json PATH` writes the figures.
"""

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import QUICK_SIZES, add_model_arguments, apply_preset, build_models, count_flops  # noqa: E402


def median_seconds(function, steps: int, warmup: int, synchronize) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(steps):
        synchronize()
        start = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256, help="tokens per block (a multiple of K)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny model, one step")
    parser.add_argument("--compile", action="store_true", help="both models under torch.compile")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK_SIZES.items():
            setattr(args, name, value)
        args.batch_size, args.seq_length, args.steps, args.warmup = 2, 32, 1, 1
    apply_preset(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast_bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def autocast():
        if autocast_bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    calm, llama = build_models(args, device, torch.float32, args.seq_length)
    calm.train()
    llama.train()
    if args.compile:
        calm.compile()
        llama.compile()
    print(
        f"backbone: hidden {args.hidden_size}, intermediate {args.intermediate_size}, {args.num_layers} layers, "
        f"{args.num_heads} heads, vocab {args.vocab_size}; CALM K={args.patch_size}, N={calm.config.num_samples}, "
        f"M={calm.config.num_targets}, head {args.num_mlp_layers} blocks, autoencoder width {args.ae_hidden_size}"
    )
    print(
        f"device {device.type}, {'bf16 autocast' if autocast_bf16 else 'float32'}, SDPA, "
        f"{'compiled' if args.compile else 'eager'}, "
        f"{torch.get_num_threads()} CPU thread(s); batch {args.batch_size} x {args.seq_length} tokens, AdamW; median "
        f"of {args.steps} step(s) each (taking turns) after {args.warmup} warm-up step(s); torch {torch.__version__}"
    )
    torch.manual_seed(args.seed)
    input_ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_length), device=device)

    def train_step(model, optimizer):
        def step():
            with autocast():
                loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    # Only trainable parameters go to the optimiser (CALM's autoencoder is frozen); foreach AdamW, the default.
    optimizers = {
        name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for name, model in (("llama", llama), ("calm", calm))
    }
    steps = {name: train_step(model, optimizers[name]) for name, model in (("llama", llama), ("calm", calm))}

    # The arithmetic of a step: one more step of each, counted (AdamW is element-wise: FlopCounterMode leaves it out).
    with torch.compiler.set_stance("force_eager"):  # counted eagerly: the same arithmetic
        flops = {name: count_flops(step) for name, step in steps.items()}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    # The models take turns, step by step, so that a machine that changes speed affects both alike.
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(median_seconds(step, 1, 0, synchronize))
    seconds = {name: statistics.median(values) for name, values in times.items()}

    # The energy head and loss on their own: forward and backward on the backbone's (detached) hidden states.
    with torch.no_grad(), autocast():
        hidden_states = calm.model(input_ids=input_ids).last_hidden_state[:, :-1].float()
    hidden_states.requires_grad_(True)

    def head_and_loss():
        with autocast():
            loss = calm.head_loss(hidden_states, input_ids)[0]
        loss.backward()
        calm.zero_grad(set_to_none=True)
        hidden_states.grad = None

    def targets_posterior():
        with torch.no_grad(), autocast():
            calm.autoencoder.encode(input_ids[:, args.patch_size :])

    head_seconds = median_seconds(head_and_loss, args.steps, args.warmup, synchronize)
    with torch.compiler.set_stance("force_eager"):
        head_flops = count_flops(head_and_loss)
    encode_seconds = median_seconds(targets_posterior, args.steps, args.warmup, synchronize)

    tokens = args.batch_size * args.seq_length
    print(f"{'model':<8} {'step s':>8} {'tokens/s':>10} {'speed-up':>9} {'GFLOP/step':>11} {'FLOP ratio':>11}")
    for name in ("llama", "calm"):
        print(
            f"{name:<8} {seconds[name]:8.3f} {tokens / seconds[name]:10.1f} {seconds['llama'] / seconds[name]:8.2f}x "
            f"{flops[name] / 1e9:11.1f} {flops['llama'] / flops[name]:10.2f}x"
        )
    share = head_seconds / seconds["calm"]
    flop_share = head_flops / flops["calm"]
    print(
        f"CALM energy head + loss (forward + backward): {1000 * head_seconds:.1f} ms = {100 * share:.1f}% of a step's "
        f"time and {100 * flop_share:.1f}% of its FLOPs (of which the autoencoder's posterior of the targets "
        f"{1000 * encode_seconds:.1f} ms, {100 * encode_seconds / seconds['calm']:.1f}%)"
    )
    print()
    print(f"tokens/s llama: {tokens / seconds['llama']:.1f}")
    print(f"tokens/s calm: {tokens / seconds['calm']:.1f}")
    print(f"speedup calm: {seconds['llama'] / seconds['calm']:.2f}")
    print(f"flop ratio calm: {flops['llama'] / flops['calm']:.2f}")
    print(f"head+loss share: {share:.3f}")
    print(f"head+loss flop share: {flop_share:.3f}")
    if args.json:
        report = {
            "settings": {
                **vars(args),
                "device": device.type,
                "bf16_autocast": autocast_bf16,
                "torch": torch.__version__,
            },
            "step_seconds": seconds,
            "tokens_per_second": {name: tokens / seconds[name] for name in seconds},
            "speedup": seconds["llama"] / seconds["calm"],
            "flops_per_step": flops,
            "head_and_loss_time_share": share,
            "head_and_loss_flop_share": flop_share,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"-> {args.json}")


if __name__ == "__main__":
    main()
