"""Worker for tests/test_fsdp2_monitor.py: run under `torchrun --standalone --nproc_per_node 2`, write rank<r>.json.

One launch runs every check (process start-up and imports dominate the cost):

* "functions": `sharded_top_k_svd` / `sharded_projection_energy` on matrices split by rows or columns (uneven and
  empty shards, exact and randomized paths, a warm start) against `top_k_svd` / `projection_energy` of the whole
  matrix with the same generator state: the largest relative gap of S and of the energy, 1 - the smallest principal
  cosine between the U (and V) bases; and `all_finite_everywhere` on rank-dependent flags.
* "dense": SpectralMonitorCallback (exact and randomized paths) driven through the Trainer's hook sequence by a
  hand-written loop over a model wrapped with `fully_shard` (Linear and a transposed Conv1D, uneven row shards), each
  rank training on half of the global batch; and the same loop on the unsharded model over the whole batch. A NaN put
  into one rank's block of one gradient at the last check must make both ranks skip that matrix.
* "lora": the same with a PEFT LoRA model wrapped with `fully_shard`, monitoring the adapter branches.
"""

import json
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

D, HIDDEN, CLASSES, BATCH, STEPS, EVERY, TOPK = 12, 21, 3, 8, 6, 2, 2
NAN_STEP, NAN_TARGET = 6, "blocks.0.mlp.fc2"
LR = 1e-2
DENSE_TARGETS = "attn.qkv,attn.proj,mlp.fc1,mlp.fc2"


def functions(rank: int, world: int) -> dict:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from trainer_ext.spectral import (
        ShardedMatrix, all_finite_everywhere, projection_energy, sharded_projection_energy, sharded_top_k_svd, top_k_svd,
    )

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(0)
    worst = {"s": 0.0, "u": 0.0, "v": 0.0, "energy": 0.0}
    cases = 0

    def gap(u1, u2):
        return 1.0 - float(torch.linalg.svdvals(u1.T @ u2).min())

    for shape, k in (((33, 16), 3), ((16, 33), 3), ((40, 24), 4), ((1, 40), 1), ((200, 150), 4)):
        w = torch.randn(*shape, generator=gen) @ torch.diag(torch.linspace(3.0, 0.2, shape[1]))
        g = torch.randn(*shape, generator=gen)
        for dim in (0, 1):
            for transposed in (False, True):
                dw = distribute_tensor(w.T.contiguous() if transposed else w, mesh, [Shard(dim)])
                dg = distribute_tensor(g.T.contiguous() if transposed else g, mesh, [Shard(dim)])
                sm, sg = ShardedMatrix.from_dtensor(dw, transposed), ShardedMatrix.from_dtensor(dg, transposed)
                for exact in (512, 0):
                    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
                    warm1 = warm2 = None
                    for _ in range(2):  # the second call warm-starts from the first call's V
                        u, s, v = top_k_svd(w, k, exact_max_dim=exact, generator=g1, warm_start=warm1)
                        us, ss, vs = sharded_top_k_svd(sm, k, exact_max_dim=exact, generator=g2, warm_start=warm2)
                        warm1, warm2 = v, vs
                        p, ps = projection_energy(g, u, v), sharded_projection_energy(sg, us, vs)
                        worst["s"] = max(worst["s"], float(((ss - s).abs() / s).max()))
                        worst["u"] = max(worst["u"], gap(u, us))
                        worst["v"] = max(worst["v"], gap(v, vs))
                        worst["energy"] = max(worst["energy"], abs(ps - p) / p)
                        cases += 1
    flags = all_finite_everywhere([True, rank == 0, rank == 1, True])
    return {"worst": worst, "cases": cases, "agreed_flags": flags}


class Block(nn.Module):
    """timm-like names; mlp.c_fc is GPT-2's Conv1D (weight stored (in, out): row shards are column blocks of W)."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(D, 3 * D)
        self.attn.proj = nn.Linear(3 * D, D)
        self.mlp = nn.Module()
        self.mlp.c_fc = Conv1D(HIDDEN, D)
        self.mlp.fc2 = nn.Linear(HIDDEN, D)

    def forward(self, x):
        x = x + self.attn.proj(torch.tanh(self.attn.qkv(x)))
        return x + self.mlp.fc2(torch.relu(self.mlp.c_fc(x)))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block() for _ in range(2)])
        self.head = nn.Linear(D, CLASSES)
        with torch.no_grad():  # spread singular values (as trained weights have): top-k subspaces well defined, so
            for m in self.modules():  # sharded vs unsharded compares the implementation, not float32 conditioning
                if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
                    a, b = m.weight.shape
                    qa, _ = torch.linalg.qr(torch.randn(a, min(a, b)))
                    qb, _ = torch.linalg.qr(torch.randn(b, min(a, b)))
                    m.weight.copy_(qa @ torch.diag(torch.linspace(2.0, 0.1, min(a, b))) @ qb.T)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * BATCH, D, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return x, y


def shard(model: nn.Module, blocks=None) -> nn.Module:
    """fully_shard every block (the transformer blocks, found by name) and then the root, as FSDP2 recipes do."""
    from torch.distributed.fsdp import fully_shard

    for name, b in model.named_modules():
        if name.rsplit(".", 2)[-2:-1] == ["blocks"]:
            fully_shard(b)
    fully_shard(model)
    return model


def full(x):
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def sync(model, mirror, opt=None) -> SimpleNamespace:
    """Copy the sharded model's weights and gradients (and Adam's exp_avg) whole into the unsharded `mirror`; returns
    a stand-in optimizer whose `state` holds the gathered moments under the mirror's parameters."""
    theirs = dict(mirror.named_parameters())
    state = {}
    for name, p in model.named_parameters():
        q = theirs[name]
        q.data.copy_(full(p.detach()))
        q.grad = None if p.grad is None else full(p.grad).clone()
        if opt is not None and p in opt.state:
            state[q] = {"exp_avg": full(opt.state[p]["exp_avg"]).clone()}
    return SimpleNamespace(state=state)


def run(model, callbacks, rank: int, world: int, sharded: bool, nan: bool, mirror=None, mirrored=()) -> None:
    """The Trainer's hook order (transformers.Trainer._inner_training_loop), one optimizer update per batch. With a
    `mirror` (an unsharded copy), the `mirrored` callbacks observe whole copies of the same weights, gradients and
    moments at the same hooks: the one-process computation on identical inputs."""
    from transformers import TrainerControl, TrainerState

    x, y = data()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    state, control = TrainerState(), TrainerControl()
    state.is_world_process_zero = rank == 0
    args = SimpleNamespace(process_index=rank, world_size=world, output_dir="unused", deepspeed=None, fsdp=None)
    for cb in callbacks:
        cb.on_train_begin(args, state, control, model=model)
    for cb in mirrored:
        cb.on_train_begin(args, state, control, model=mirror)
    for step in range(STEPS):
        xb, yb = x[step * BATCH:(step + 1) * BATCH], y[step * BATCH:(step + 1) * BATCH]
        if sharded:  # each rank its half of the global batch; FSDP2 averages the gradients over ranks
            half = BATCH // world
            xb, yb = xb[rank * half:(rank + 1) * half], yb[rank * half:(rank + 1) * half]
        nn.functional.cross_entropy(model(xb), yb).backward()
        poison = nan and step + 1 == NAN_STEP and (not sharded or rank == 1)
        if poison:  # a NaN in row 7 of the gradient: in rank 1's block (rows 6-11) when sharded
            grad = dict(model.named_parameters())[f"{NAN_TARGET}.weight"].grad
            grad = grad.to_local() if sharded else grad
            grad[7 - (D // world if sharded else 0), 0] = float("nan")
        if mirror is not None:
            sync(model, mirror)
        for cb in callbacks:
            cb.on_pre_optimizer_step(args, state, control)
        for cb in mirrored:
            cb.on_pre_optimizer_step(args, state, control)
        if poison:
            grad.nan_to_num_(0.0)
        opt.step()
        for cb in callbacks:
            cb.on_optimizer_step(args, state, control, optimizer=opt)
        if mirror is not None:
            gathered = sync(model, mirror, opt)
            for cb in mirrored:
                cb.on_optimizer_step(args, state, control, optimizer=gathered)
        opt.zero_grad()
        state.global_step += 1
        for cb in list(callbacks) + list(mirrored):
            cb.on_step_end(args, state, control)


def monitors(targets: str, track=("weight", "grad", "momentum")):
    from trainer_ext import SpectralMonitorCallback

    return [SpectralMonitorCallback(targets=targets, every=EVERY, topk=TOPK, track=track, plots=False, exact_max_dim=e)
            for e in (128, 0)]


def dense(rank: int, world: int) -> dict:
    """fsdp2: the monitor on the sharded model; mirror: on whole copies of the same tensors; reference: a separate
    unsharded run over the whole batches (its trajectory differs from the sharded one by round-off only)."""
    out = {}
    model, mirror = shard(Tiny(), None), Tiny()
    cbs, mirrored = monitors(DENSE_TARGETS), monitors(DENSE_TARGETS)
    run(model, cbs, rank, world, sharded=True, nan=True, mirror=mirror, mirrored=mirrored)
    out["fsdp2"], out["mirror"] = [cb.records for cb in cbs], [cb.records for cb in mirrored]
    out["split"] = sorted(cbs[0]._split)
    out["tracker_s"] = {n: t.s.tolist() for cb in cbs for n, t in cb.trackers.items()}
    out["placements"] = {n: str(p.placements) for n, p in model.named_parameters() if n.endswith("weight")}
    cbs = monitors(DENSE_TARGETS)
    run(Tiny(), cbs, rank, world, sharded=False, nan=True)
    out["reference"] = [cb.records for cb in cbs]
    return out


def lora(rank: int, world: int) -> dict:
    from peft import LoraConfig, get_peft_model

    def build():
        return get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc2"],
                                                 init_lora_weights="gaussian"))

    out = {}
    model, mirror = shard(build(), None), build()
    cbs, mirrored = monitors("attn.qkv,mlp.fc2", ("weight",)), monitors("attn.qkv,mlp.fc2", ("weight",))
    run(model, cbs, rank, world, sharded=True, nan=False, mirror=mirror, mirrored=mirrored)
    out["fsdp2"], out["mirror"] = [cb.records for cb in cbs], [cb.records for cb in mirrored]
    out["split"] = sorted(cbs[0]._split)
    return out


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    result = {"world": world, "functions": functions(rank, world), "dense": dense(rank, world), "lora": lora(rank, world)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
