"""What trainer_ext.ForgettingCallback costs: one check against the training steps it is spread over, side by side.

Run from the repository root:

    .venv/bin/python benchmarks/forgetting_overhead.py                          # SmolLM2-135M + LoRA r=8, CPU
    .venv/bin/python benchmarks/forgetting_overhead.py --json results/forgetting_overhead.json
    .venv/bin/python benchmarks/forgetting_overhead.py --model llama-tiny --rounds 2    # seconds, no package needed

Model: the embedded SmolLM2-135M-Instruct (recipes/smollm2.py; Q4_1-dequantised weights) with a PEFT LoRA of rank
--rank on every attention and MLP linear, or with `--model llama-tiny` a small random Llama built in-process.
A training step = forward + backward + AdamW step on --batch-size sequences of --seq-len tokens of Python's
documentation. A check = ForgettingCallback.measure on --ref-texts held-out paragraphs of --ref-len tokens (both base
modes: "cache" scores the model once per batch, "disable_adapter" twice). Steps and checks are timed interleaved
(one check, then --steps-per-round steps, per round), medians over --rounds.

Overhead at every=N = t_check / (N x t_step): the share of training time the callback adds when it checks every N
updates (the issue's target: cheap enough for every=100).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "recipes")]
from calibration import OtherLoad  # noqa: E402
from recipes.common import machine_info, write_json  # noqa: E402

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("smollm2", "llama-tiny"), default="smollm2", help="what to train (see the doc)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank on every attention and MLP linear")
    p.add_argument("--batch-size", type=int, default=8, help="training sequences per step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per training sequence")
    p.add_argument("--ref-texts", type=int, default=8, help="held-out reference paragraphs scored per check")
    p.add_argument("--ref-len", type=int, default=128, help="tokens per reference paragraph")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (one check of each mode + steps per round)")
    p.add_argument("--steps-per-round", type=int, default=3, help="training steps timed per round")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--json", default=None, help="also write the figures and the printed report here")
    return p.parse_args(argv)


def load(args):
    if args.model == "smollm2":
        from smollm2 import load_smollm2

        return load_smollm2(os.path.join(os.path.dirname(HERE), "runs", "cache"), log=lambda *_: None)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>"] + sorted({w for t in texts(200) for w in t.split()})[:2000]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, pad_token_id=0)
    return LlamaForCausalLM(cfg), tok


def texts(n: int) -> list[str]:
    import data

    return data.general_text("heldout")[:n] + data.general_text("calibration")[: max(0, n - 60)]


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    from trainer_ext import ForgettingCallback
    import data

    model, tok = load(args)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    train_text = data.general_text("calibration")
    batch = tok(train_text[: args.batch_size], return_tensors="pt", padding="max_length", truncation=True,
                max_length=args.seq_len)
    ref = data.general_text("heldout")[: args.ref_texts]
    checks = {mode: ForgettingCallback(ref, tok, every=100, max_length=args.ref_len, batch_size=8, base=mode)
              for mode in ("cache", "disable_adapter")}
    state = type("S", (), {"global_step": 0, "epoch": 0.0, "log_history": []})()
    for cb in checks.values():
        cb.on_train_begin(None, state, type("C", (), {"should_log": False})(), model=model)

    def step():
        model.train()
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    times = {"step": [], "cache": [], "disable_adapter": []}
    load_meter = OtherLoad()
    for _ in range(args.rounds):
        for mode, cb in checks.items():
            t0 = time.perf_counter()
            cb.measure(model)
            times[mode].append(time.perf_counter() - t0)
        for _ in range(args.steps_per_round):
            t0 = time.perf_counter()
            step()
            times["step"].append(time.perf_counter() - t0)
    other = load_meter.cores()
    med = {k: statistics.median(v) for k, v in times.items()}
    machine = machine_info()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print(f"machine: {machine['cpu_model']} ({machine['cpu_count']} CPUs), torch {machine['torch']}, "
              f"{args.threads} threads; other processes' load during the run: {other:.2f} cores")
        print(f"model {args.model} + LoRA r={args.rank}; step = {args.batch_size}x{args.seq_len} tokens; "
              f"check = {len(ref)} reference texts x <= {args.ref_len} tokens; medians of {args.rounds} rounds")
        print(f"  training step                 {med['step']:.3f} s")
        for mode in ("cache", "disable_adapter"):
            print(f"  check, base={mode:<16} {med[mode]:.3f} s = {med[mode] / med['step']:.2f} steps; "
                  f"overhead at every=100: {100 * med[mode] / (100 * med['step']):.2f}%, every=10: "
                  f"{100 * med[mode] / (10 * med['step']):.1f}%")
    print(printed.getvalue(), end="")
    if args.json:
        write_json(args.json, {"machine": machine, "args": vars(args), "median_s": med, "times": times,
                               "other_load_cores": other,
                               "printed": printed.getvalue()}, indent=2)


if __name__ == "__main__":
    main()
