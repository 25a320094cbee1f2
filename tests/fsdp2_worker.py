"""Worker for tests/test_fsdp2.py: NullSpaceLoRA calibration and the three tuners under FSDP2 (`fully_shard`, gloo).

    torchrun --nproc_per_node 2 tests/fsdp2_worker.py OUT_DIR     # writes OUT_DIR/result.json (+ saved adapters)

Rank 0 first runs every case in one process (no process group yet: the reference), then both ranks run it with the
adapters injected and then the model wrapped by `fully_shard` (each decoder layer, then the root: accelerate's
order), each rank with its share of the data. Rank 1 starts from garbage in its shards of the NullSpaceLoRA factors
(NaN in A and A0, large values in B and B0), as `cpu_ram_efficient_loading` leaves the non-main ranks before the
broadcast. Rank 0 gathers the full state dict (`get_model_state_dict(full_state_dict=True, cpu_offload=True)`),
saves each adapter atomically and loads it into a fresh one-process model. Only numbers go into the JSON; the test
judges them.
"""

from __future__ import annotations

import json
import math
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])

from peft import PeftModel, get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

from peft_ext import NullSpaceLoraConfig, OrthoSplitConfig, SubspaceLoraConfig, initialize_nullspace_lora  # noqa: E402
from peft_ext.files import save_adapter_atomic  # noqa: E402
from peft_ext.nullspace.initialize import nullspace_layers  # noqa: E402
from tests.test_calibration_callback import TARGETS, batches_of, tiny_llama, token_rows  # noqa: E402

LR = 5.0  # plain SGD: a wrongly reduced gradient moves the loss after the step (Adam's first step hides its scale)
ROWS = 8  # training rows of the one step, split evenly between the ranks (equal token counts: mean of means = mean)


def configs() -> dict:
    return {
        "nullspace_v2": NullSpaceLoraConfig(r=2, target_modules=list(TARGETS), mode="v2"),
        "nullspace_split": NullSpaceLoraConfig(r=3, target_modules=list(TARGETS), mode="split"),
        "subspace": SubspaceLoraConfig(k=3, target_modules=list(TARGETS)),
        "ortho": OrthoSplitConfig(target_modules=list(TARGETS), base_kind="int4", density=0.2, train_ortho=True),
    }


def calibration(rank: int, world: int, uneven: bool) -> tuple[list, list]:
    """(calibration, held-out) batches of this rank: round-robin shares of 9 (uneven: 5 / 4 batches on 2 ranks, so the
    short rank must keep stepping with the other) or 10 batches of 4 rows, and of 4 held-out batches."""
    calib = batches_of(token_rows(n=36 if uneven else 40, seed=3), size=4)
    held = batches_of(token_rows(n=16, seed=4), size=4)
    return calib[rank::world], held[rank::world]


def train_rows(rank: int, world: int) -> dict:
    ids = torch.tensor(token_rows(n=ROWS, seed=5)["input_ids"])
    share = ids[rank * ROWS // world : (rank + 1) * ROWS // world]
    return {"input_ids": share, "attention_mask": torch.ones_like(share), "labels": share}


def probe() -> dict:
    ids = torch.tensor(token_rows(n=3, seed=6)["input_ids"])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)


@torch.no_grad()
def garble(model) -> None:
    """Rank 1's shards of the NullSpaceLoRA factors and buffers: garbage, as before accelerate's broadcast."""
    for layer in nullspace_layers(model, "default").values():
        for t, value in ((layer.nullspace_A["default"].weight, float("nan")), (layer.nullspace_B["default"].weight, 1e3)):
            local = t.to_local() if hasattr(t, "to_local") else t
            local.fill_(value)
        for buffers in (layer.nullspace_A0, layer.nullspace_B0):
            if "default" in buffers:
                buffers["default"].fill_(float("nan"))


def full_state(model, distributed: bool) -> dict[str, torch.Tensor]:
    if not distributed:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def mean_over_ranks(x: float, distributed: bool) -> float:
    if not distributed:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t) / torch.distributed.get_world_size()


def run_case(name: str, config, rank: int, world: int, out_dir: str) -> dict:
    distributed = world > 1
    model = get_peft_model(tiny_llama(), config)
    if distributed:
        shard(model)
    result: dict = {}
    if name.startswith("nullspace"):
        if distributed and rank == 1:
            garble(model)
        if name == "nullspace_v2":  # through the Trainer callback, which shards the batches itself
            from transformers import TrainerControl, TrainerState

            from trainer_ext import NullSpaceCalibrationCallback

            calib, held = calibration(0, 1, uneven=False)
            cb = NullSpaceCalibrationCallback(calib, heldout=held, progress=False, warn=False)
            args = SimpleNamespace(seed=0, data_seed=None, per_device_train_batch_size=4, disable_tqdm=True)
            state = TrainerState(is_world_process_zero=rank == 0, is_local_process_zero=rank == 0)
            cb.on_train_begin(args, state, TrainerControl(), model=model)
            report = cb.report
        else:  # by hand, 5 / 4 batches on the two ranks
            calib, held = calibration(rank, world, uneven=True)
            report = initialize_nullspace_lora(model, calib, heldout_dataloader=held, progress=False, warn=False)
        result["tokens"] = [lr.tokens for lr in report.layers]
        result["heldout_ratio"] = [lr.heldout_ratio for lr in report.layers]
        result["init"] = {k: v for k, v in full_state(model, distributed).items() if "nullspace_" in k}
        if distributed:  # the unsharded buffers (split mode) and the flags must agree on every rank
            mine = [bool(layer.is_initialized("default")) for layer in nullspace_layers(model, "default").values()]
            buffers = {k: v for k, v in model.state_dict().items() if "nullspace_A0" in k or "nullspace_B0" in k}
            everyone: list = [None] * world
            torch.distributed.all_gather_object(everyone, (mine, buffers))
            result["flags_all_true_on_every_rank"] = all(all(f) for f, _ in everyone)
            result["buffers_max_rank_difference"] = max(
                (float((everyone[0][1][k] - b[k]).abs().max()) for _, b in everyone for k in b), default=0.0)
    # one training step of plain SGD on this rank's share of the rows
    model.train()
    adapter = ("nullspace_", "subspace_", "ortho_")
    before = {k: v for k, v in full_state(model, distributed).items() if any(p in k for p in adapter)}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR)
    batch = train_rows(rank, world)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        loss_after = float(model(**batch).loss)
        logits = model(**probe()).logits.detach().clone()
    result["loss"] = mean_over_ranks(float(loss), distributed)
    result["loss_after"] = mean_over_ranks(loss_after, distributed)
    result["logits"] = logits
    state = full_state(model, distributed)
    result["trained"] = {k: v for k, v in state.items() if any(p in k for p in adapter)}
    # how far the step moved the adapter: the scale the 1- vs 2-process differences are judged against
    result["update_size"] = max(float((result["trained"][k].double() - v.double()).abs().max())
                                for k, v in before.items() if v.numel()) if before else None  # rank 0 only
    if rank == 0:
        folder = os.path.join(out_dir, f"{name}-{'two' if distributed else 'one'}")
        save_adapter_atomic(model, folder, state_dict=state)
        loaded = PeftModel.from_pretrained(tiny_llama(), folder).eval()
        with torch.no_grad():
            result["loaded_logits"] = loaded(**probe()).logits
    return result


def refusals() -> dict[str, str]:
    """get_peft_model on an already sharded model: each tuner refuses before anything changes."""
    from torch.distributed.fsdp import fully_shard

    out = {}
    for name, config in configs().items():
        base = tiny_llama()
        for layer in base.model.layers:
            fully_shard(layer)
        fully_shard(base)
        before = [(n, type(m)) for n, m in base.named_modules()], [(n, id(p)) for n, p in base.named_parameters()]
        try:
            get_peft_model(base, config)
            out[name] = "accepted"
        except ValueError as e:
            after = [(n, type(m)) for n, m in base.named_modules()], [(n, id(p)) for n, p in base.named_parameters()]
            unchanged = after == before and not any(isinstance(m, BaseTunerLayer) for m in base.modules())
            out[name] = str(e) if unchanged else f"changed before refusing: {e}"
    return out


def empty_rank(rank: int) -> str:
    """Rank 1 has no calibration batch at all: both ranks raise the same error (no rank is left in a forward)."""
    model = get_peft_model(tiny_llama(), configs()["nullspace_v2"])
    shard(model)
    calib, _ = calibration(0, 1, uneven=False)
    try:
        initialize_nullspace_lora(model, calib[:2] if rank == 0 else [], progress=False, warn=False)
    except ValueError as e:
        return str(e)
    return "accepted"


def compare(one: dict, two: dict) -> dict:
    """Numbers the test judges (all 0 / 1 when sharding changes nothing)."""

    def projector(a: torch.Tensor) -> torch.Tensor:
        q, _ = torch.linalg.qr(a.double().T)
        return q @ q.T

    out: dict = {}
    for case in one:
        o, t = one[case], two[case]
        c: dict = {"loss": abs(o["loss"] - t["loss"]), "loss_after": abs(o["loss_after"] - t["loss_after"]),
                   "loss_moved": o["loss"] - o["loss_after"], "update_size": o["update_size"],
                   "logits": float((o["logits"] - t["logits"]).abs().max()),
                   "loaded_vs_trained_two": float((t["loaded_logits"] - t["logits"]).abs().max()),
                   "loaded_vs_trained_one": float((o["loaded_logits"] - o["logits"]).abs().max())}
        assert o["trained"].keys() == t["trained"].keys(), case
        if case.startswith("nullspace"):
            c["tokens_equal"] = o["tokens"] == t["tokens"]
            c["heldout_ratio"] = max(abs(a - b) for a, b in zip(o["heldout_ratio"], t["heldout_ratio"]))
            cosines, projections, products = [], [], []
            for key, a1 in o["init"].items():
                if key.endswith("nullspace_A.default.weight"):
                    a2 = t["init"][key]
                    q1, _ = torch.linalg.qr(a1.double().T)
                    q2, _ = torch.linalg.qr(a2.double().T)
                    cosines.append(float(torch.linalg.svdvals(q1.T @ q2).min()))
                    projections.append(float((projector(a1) - projector(a2)).abs().max()))
                    b_key = key.replace("nullspace_A", "nullspace_B")
                    # B A after training: invariant to the basis chosen inside the null space (signs, rotations)
                    prod1 = o["trained"][b_key].double() @ o["trained"][key].double()
                    prod2 = t["trained"][b_key].double() @ t["trained"][key].double()
                    products.append(float((prod1 - prod2).abs().max()))
                if key.endswith("nullspace_B0.default"):  # split: B0 A0 = W P / s, basis-invariant too
                    a_key = key.replace("nullspace_B0", "nullspace_A0")
                    p1 = o["init"][key].double() @ o["init"][a_key].double()
                    p2 = t["init"][key].double() @ t["init"][a_key].double()
                    products.append(float((p1 - p2).abs().max()))
            c["min_principal_cosine"] = min(cosines)
            c["projector_max_diff"] = max(projections)
            c["products_max_diff"] = max(products)
            c["layers"] = len(cosines)
            c["init_finite"] = all(bool(torch.isfinite(v).all()) for v in t["init"].values())
            c["flags_all_true_on_every_rank"] = t["flags_all_true_on_every_rank"]
            c["buffers_max_rank_difference"] = t["buffers_max_rank_difference"]
        else:
            c["trained_max_diff"] = max(float((o["trained"][k].double() - t["trained"][k].double()).abs().max())
                                        for k in o["trained"] if o["trained"][k].numel())
        out[case] = c
    return out


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    one = {name: run_case(name, cfg, 0, 1, out_dir) for name, cfg in configs().items()} if rank == 0 else None
    torch.distributed.init_process_group("gloo")
    try:
        two = {name: run_case(name, cfg, rank, world, out_dir) for name, cfg in configs().items()}
        refused = refusals()
        refused["empty_rank"] = empty_rank(rank)
        everyone: list = [None] * world
        torch.distributed.all_gather_object(everyone, refused["empty_rank"])
        refused["empty_rank_same_on_every_rank"] = len(set(everyone)) == 1
    finally:
        torch.distributed.destroy_process_group()
    if rank == 0:
        result = {"world": world, "cases": compare(one, two), "refusals": refused}
        tmp = os.path.join(out_dir, "result.json.tmp")
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=lambda v: v if math.isfinite(v) else str(v))
        os.replace(tmp, os.path.join(out_dir, "result.json"))


if __name__ == "__main__":
    main(sys.argv[1])
