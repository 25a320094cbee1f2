"""Worker for tests/test_distributed.py: collect statistics with accelerate-sharded data, write them from rank 0.

Run alone (1 process) or under `accelerate launch --multi_gpu --num_processes 2` with ACCELERATE_USE_CPU=true.
"""

import sys

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from peft_ext import ActivationStats

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from tests.conftest import tiny_bert, token_batches  # noqa: E402


def main(out_path: str) -> None:
    accelerator = Accelerator(cpu=True)
    model = tiny_bert()
    # 8 samples of varying padding; accelerate gives each process its own batches
    samples = [
        {k: v[i] for k, v in batch.items()} for batch in token_batches(n_batches=4, batch=2, seed=7, pad_last=2) for i in range(2)
    ]
    loader = accelerator.prepare(DataLoader(samples, batch_size=2, shuffle=False))
    stats = ActivationStats.collect(model, loader, ["query", "key", "value", "dense"], progress=False)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    local_batches = len(loader)
    if accelerator.is_main_process:
        stats.save(out_path, metadata={"world_size_seen": world, "local_batches": local_batches})
    accelerator.wait_for_everyone()
    # tear the process group down before exit: left to the interpreter's exit, gloo's threads may still be running
    # when their objects are destroyed ("terminate called without an active exception", SIGABRT on a loaded CI box)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
