"""Worker for tests/test_distributed.py: a SpectralTrainer under DDP writes what each rank logged."""

import json
import os
import sys

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])

import torch  # noqa: E402

from tests.test_callbacks import Data, TinyViT, _args  # noqa: E402
from trainer_ext import SpectralTrainer, SpectralTrainingArguments  # noqa: E402


def main(out_dir: str) -> None:
    args = SpectralTrainingArguments(**_args(out_dir, max_steps=4, per_device_train_batch_size=4),
                                     spec_monitor=True, spec_every=2, spec_topk=2, spec_targets="attn.qkv,mlp.fc1,mlp.fc2")
    trainer = SpectralTrainer(model=TinyViT(), args=args, train_dataset=Data())
    trainer.train()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    logged = [{k: v for k, v in e.items() if k.startswith("spec/") or k == "step"}
              for e in trainer.state.log_history if any(k.startswith("spec/") for k in e)]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"world": world, "decomposed_here": sorted(trainer.spectral_monitor.trackers), "logged": logged}, f)
    # tear the process group down before exit: left to the interpreter's exit, gloo's threads may still be running
    # when their objects are destroyed ("terminate called without an active exception", SIGABRT on a loaded CI box)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
