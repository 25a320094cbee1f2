"""Complete-or-absent outputs (issue 13, items 1 and 17): atomic_directory, atomic_file, save_adapter_atomic and
SpectralTrainer saves, checked by SIGKILLing a real (forked) process while it writes."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from torch import nn

from peft_ext import files, save_adapter_atomic
from peft_ext.files import atomic_directory, atomic_file, clean_stale_temporaries
from tests.conftest import Toy

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill tests fork a real process")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _temp_name(dest: str, pid: int, rand: str = "abcd1234") -> str:
    return f".{os.path.basename(dest)}.tmp-{pid}-{files._HOST}-{rand}"


def kill_mid_write(flag, child, timeout: float = 60.0) -> None:
    """Fork; the child runs `child(flag)`, which touches `flag` when it is half-way through a write and then hangs;
    the parent SIGKILLs it right then. A fork, not a fresh interpreter: importing peft alone takes seconds."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns into pytest
        try:
            # one thread: GNU OpenMP is not fork-safe, and a child that enters a parallel region with the pool the
            # parent left behind (2 threads, after earlier tests ran) can hang there (seen in CI: "did not reach")
            torch.set_num_threads(1)
            child(flag)
        finally:
            os._exit(3)
    deadline, reaped = time.monotonic() + timeout, False
    try:
        while not os.path.exists(flag):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                reaped = True
                pytest.fail(f"the child exited (status {status}) before it reached the write")
            if time.monotonic() > deadline:
                pytest.fail("the child did not reach the write in time")
            time.sleep(0.005)
    finally:
        if not reaped:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def hang_after_half(flag):
    """Stand-in for safetensors' save_file: writes the whole file, cuts it to half (what the disk holds half-way
    through a write), tells the parent, waits to be killed."""
    from safetensors.torch import save_file

    def slow(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        open(flag, "w").close()
        time.sleep(120)

    return slow


def two_adapter_model(seed: int) -> PeftModel:
    model = get_peft_model(Toy(), LoraConfig(r=2, target_modules=["q", "k"]))
    model.add_adapter("other", LoraConfig(r=3, target_modules=["out"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def adapter_tensors(model, name="default") -> dict:
    return {k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def assert_loads_as(folder, expected: dict) -> None:
    loaded = PeftModel.from_pretrained(Toy(), str(folder))
    got = adapter_tensors(loaded)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def siblings(path) -> list[str]:
    return sorted(os.listdir(os.path.dirname(os.path.abspath(path))))


# ------------------------------------------------------------------------------------------------ atomic_directory
def test_success_renames_into_place_with_default_permissions(tmp_path):
    out = tmp_path / "sub" / "out"
    with atomic_directory(out) as tmp:
        assert not out.exists() and os.path.dirname(tmp) == str(out.parent)
        (open(os.path.join(tmp, "a.txt"), "w")).write("x")
    assert (out / "a.txt").read_text() == "x" and os.listdir(out.parent) == ["out"]
    assert _mode(out) == 0o777 & ~_umask()  # mkdtemp alone would give 0o700


def test_failure_leaves_nothing_and_existing_output_is_kept_or_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            open(os.path.join(tmp, "half.txt"), "w").write("x")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match=r"out_dir=.*exists; pass overwrite=True"):
        with atomic_directory(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(out, overwrite=True):
            raise RuntimeError("boom")
    assert (out / "old.txt").read_text() == "old" and os.listdir(tmp_path) == ["out"]
    with atomic_directory(out, overwrite=True) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert os.listdir(out) == ["new.txt"] and os.listdir(tmp_path) == ["out"]


def test_replacing_keeps_a_private_folder_private(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o700)  # the user made it private; a swap must not publish the new content to everyone
    with atomic_directory(out, overwrite=True) as tmp:
        open(os.path.join(tmp, "a"), "w").close()
    assert _mode(out) == 0o700


def test_symlinked_out_dir_keeps_the_link_and_replaces_its_target(tmp_path):
    (tmp_path / "runs").mkdir()
    target, link = tmp_path / "runs" / "v1", tmp_path / "latest"
    link.symlink_to(target, target_is_directory=True)  # dangling: its target is created on the first write
    for text in ("one", "two"):
        with atomic_directory(link, overwrite=True) as tmp:
            open(os.path.join(tmp, "a.txt"), "w").write(text)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target / "a.txt").read_text() == "two"
    # before: the link itself was replaced by a folder and a ".latest.tmp-*.old" link was left beside it
    assert sorted(os.listdir(tmp_path)) == ["latest", "runs"] and os.listdir(tmp_path / "runs") == ["v1"]

    with pytest.raises(ValueError, match=r"out_dir=.*nowhere.* is a symbolic link to .*missing/x.*whose folder does "
                                         r"not exist; create that folder or point the link elsewhere"):
        (tmp_path / "nowhere").symlink_to(tmp_path / "missing" / "x")
        with atomic_directory(tmp_path / "nowhere", overwrite=True):
            pass


def test_refuses_a_file_and_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"out_dir=.*/f' is a file, not a folder; pass a folder path"):
        with atomic_directory(tmp_path / "f", overwrite=True):
            pass
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(ValueError, match=r"out_dir=.* is \(or holds\) the current working directory.*sub-folder"):
        with atomic_directory(tmp_path, overwrite=True):
            pass
    assert (tmp_path / "f").read_text() == "x"


def test_stale_temporaries_are_removed_only_when_their_writer_is_gone(tmp_path):
    out = str(tmp_path / "out")
    dead, old = _dead_pid(), time.time() - files.STALE_AFTER_S - 60
    names = {
        "dead": _temp_name(out, dead, "dead0000"),
        "dead_old": _temp_name(out, dead, "dead1111") + ".old",
        "alive": _temp_name(out, os.getppid(), "live0000"),  # pytest's parent: certainly running
        "legacy_recent": ".out.tmp-abcdefgh",  # written by an older peft-ext: no pid, judged by age
        "legacy_aged": ".out.tmp-zyxwvuts",
        "other_host": f".out.tmp-{dead}-elsewhere-abcd5678",
        "other_dest": _temp_name(str(tmp_path / "outer"), dead),
        "dest_twin": ".out.tmp-notmine",  # not a temporary name we write
    }
    for key, name in names.items():
        os.makedirs(tmp_path / name / "sub")
        (tmp_path / name / "sub" / "w.bin").write_bytes(b"x" * 10)
    os.utime(tmp_path / names["legacy_aged"], (old, old))
    (tmp_path / ".out.tmp-stray000.old").symlink_to(tmp_path / names["alive"])  # left by the old symlink swap
    with atomic_directory(out) as tmp:
        open(os.path.join(tmp, "a"), "w").close()
    left = set(os.listdir(tmp_path))
    assert "out" in left and ".out.tmp-stray000.old" not in left
    for key in ("dead", "dead_old", "legacy_aged"):
        assert names[key] not in left, key
    for key in ("alive", "legacy_recent", "other_host", "other_dest", "dest_twin"):
        assert names[key] in left, key
    assert os.listdir(tmp_path / names["alive"] / "sub") == ["w.bin"]  # the link was removed, not followed


def test_a_swap_killed_between_its_two_renames_is_repaired(tmp_path, monkeypatch):
    """Without an atomic exchange (not Linux, or a filesystem without it) the swap is two renames; a kill between
    them leaves the destination missing, and the next write puts the complete new version in place."""
    out = tmp_path / "out"
    dead = _dead_pid()
    new, old = tmp_path / _temp_name(str(out), dead), tmp_path / (_temp_name(str(out), dead) + ".old")
    new.mkdir()
    (new / "v").write_text("new")
    old.mkdir()
    (old / "v").write_text("old")
    assert clean_stale_temporaries(out) == [str(old)]
    assert (out / "v").read_text() == "new" and os.listdir(tmp_path) == ["out"]

    monkeypatch.setattr(files, "_rename2", lambda *a: False)  # the fallback path itself still swaps correctly
    with atomic_directory(out, overwrite=True, merge=True) as tmp:
        open(os.path.join(tmp, "w"), "w").write("2")
    assert sorted(os.listdir(out)) == ["v", "w"] and os.listdir(tmp_path) == ["out"]


def test_atomic_file_default_permissions_links_and_failure(tmp_path):
    path = tmp_path / "d" / "r.json"
    with atomic_file(path) as tmp:
        open(tmp, "w").write("1")
    assert path.read_text() == "1" and _mode(path) == 0o666 & ~_umask()  # mkstemp alone: 0o600
    os.chmod(path, 0o600)
    with atomic_file(path) as tmp:
        open(tmp, "w").write("2")
    assert path.read_text() == "2" and _mode(path) == 0o600  # replacing keeps the file's own permissions
    link = tmp_path / "link.json"
    link.symlink_to(path)
    with atomic_file(link) as tmp:
        open(tmp, "w").write("3")
    assert link.is_symlink() and path.read_text() == "3"
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("boom")
    assert path.read_text() == "3" and os.listdir(tmp_path / "d") == ["r.json"]


def test_lorax_svd_cache_entries_get_default_permissions(tmp_path):
    from peft_ext.lorax import SvdCache, TransferOptions

    cache = SvdCache(str(tmp_path / "svd"), TransferOptions())
    cache(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), 2)
    (entry,) = os.listdir(tmp_path / "svd")  # no temporary left beside it
    assert entry.endswith(".safetensors") and _mode(tmp_path / "svd" / entry) == 0o666 & ~_umask()


# ---------------------------------------------------------------------------------------------- save_adapter_atomic
@pytest.mark.parametrize("how", ["peft_in_place", "save_adapter_atomic"])
def test_sigkill_while_saving_over_an_adapter(tmp_path, how):
    out = tmp_path / "adapter"
    old_model, new_model = two_adapter_model(0), two_adapter_model(1)
    old = {n: adapter_tensors(old_model, n) for n in ("default", "other")}
    new = {n: adapter_tensors(new_model, n) for n in ("default", "other")}
    save_adapter_atomic(old_model, out)
    (out / "notes.txt").write_text("mine")

    def child(flag):
        import peft.peft_model

        peft.peft_model.safe_save_file = hang_after_half(flag)
        if how == "peft_in_place":
            new_model.save_pretrained(str(out))
        else:
            save_adapter_atomic(new_model, out)

    kill_mid_write(tmp_path / "half", child)
    if how == "peft_in_place":  # the issue, reproduced at this kill point: old config, half the new weights
        with pytest.raises(Exception):
            PeftModel.from_pretrained(Toy(), str(out))
        return
    assert_loads_as(out, old["default"])
    assert_loads_as(out / "other", old["other"])
    assert (out / "notes.txt").read_text() == "mine"
    (temp,) = [n for n in os.listdir(tmp_path) if n.startswith(".adapter.tmp-")]  # killed mid-write, not before
    assert 0 < os.path.getsize(tmp_path / temp / "adapter_model.safetensors")

    save_adapter_atomic(new_model, out)  # the next write removes the dead writer's temporary
    assert sorted(os.listdir(tmp_path)) == ["adapter", "half"]
    assert_loads_as(out, new["default"])
    assert_loads_as(out / "other", new["other"])
    assert (out / "notes.txt").read_text() == "mine"


def test_save_adapter_atomic_leaves_what_an_in_place_save_would(tmp_path):
    first, second = two_adapter_model(0), two_adapter_model(1)
    in_place, atomic = tmp_path / "in_place", tmp_path / "atomic"
    for out in (in_place, atomic):
        first.save_pretrained(str(out))
        (out / "README.md").write_text((out / "README.md").read_text() + "\nmy own words\n")
        (out / "notes").mkdir()
        (out / "notes" / "n.txt").write_text("mine")
        os.chmod(out / "adapter_config.json", 0o600)
    second.save_pretrained(str(in_place), selected_adapters=["default"], safe_serialization=False)
    returned = save_adapter_atomic(second, atomic, selected_adapters=["default"], safe_serialization=False)
    assert returned == str(atomic)

    def tree(root):
        return sorted(os.path.relpath(os.path.join(h, n), root) for h, _, ns in os.walk(root) for n in ns)

    # the same files (notes/, other/ kept, adapter_model.bin added), but no stale adapter_model.safetensors, which
    # PEFT prefers: in place, the reload silently gives the old weights
    assert tree(atomic) == [n for n in tree(in_place) if n != "adapter_model.safetensors"]
    assert "other/adapter_config.json" in tree(atomic) and "notes/n.txt" in tree(atomic)
    assert (atomic / "README.md").read_text() == (in_place / "README.md").read_text()
    assert "my own words" in (atomic / "README.md").read_text()
    assert _mode(atomic / "adapter_config.json") == 0o600 and _mode(atomic / "adapter_model.bin") == 0o666 & ~_umask()
    assert_loads_as(atomic, adapter_tensors(second))
    assert_loads_as(in_place, adapter_tensors(first))
    assert sorted(os.listdir(tmp_path)) == ["atomic", "in_place"]


def test_save_adapter_atomic_through_a_symlink_and_its_refusals(tmp_path):
    model = two_adapter_model(0)
    (tmp_path / "store").mkdir()
    link = tmp_path / "current"
    link.symlink_to(tmp_path / "store" / "a1", target_is_directory=True)
    save_adapter_atomic(model, link)
    save_adapter_atomic(model, link)
    assert link.is_symlink() and (tmp_path / "store" / "a1" / "adapter_config.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["current", "store"] and os.listdir(tmp_path / "store") == ["a1"]
    assert_loads_as(link, adapter_tensors(model))
    with pytest.raises(TypeError, match=r"model is a Toy, not a peft.PeftModel; wrap the base model with peft"):
        save_adapter_atomic(Toy(), tmp_path / "x")
    with pytest.raises(TypeError, match="got save_directory as a keyword; pass the folder as out_dir"):
        save_adapter_atomic(model, tmp_path / "x", save_directory=str(tmp_path / "y"))
    assert not (tmp_path / "x").exists()


# -------------------------------------------------------------------------------------------------- SpectralTrainer
class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.out = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x, labels=None):
        logits = self.out(torch.tanh(self.q(x)))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(6, generator=g), "labels": torch.tensor(i % 3)}


def trainer_for(out, **overrides):
    from transformers import TrainingArguments

    from trainer_ext import SpectralTrainer

    model = get_peft_model(Classifier(), LoraConfig(r=2, target_modules=["q"]))
    args = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, report_to="none",
                use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    return SpectralTrainer(model=model, args=TrainingArguments(**{**args, **overrides}), train_dataset=Rows())


def test_trainer_save_model_over_an_existing_adapter_survives_sigkill(tmp_path):
    out = tmp_path / "run"
    trainer = trainer_for(out)
    trainer.save_model()
    old = adapter_tensors(trainer.model)
    (out / "checkpoint-7").mkdir()  # what a run keeps in output_dir besides the final adapter
    (out / "checkpoint-7" / "optimizer.pt").write_bytes(b"state")
    with torch.no_grad():
        trainer.model.base_model.model.q.lora_B["default"].weight.fill_(0.5)
    new = adapter_tensors(trainer.model)

    def child(flag):
        import peft.peft_model

        peft.peft_model.safe_save_file = hang_after_half(flag)
        trainer.save_model()

    kill_mid_write(tmp_path / "half", child)  # before the fix: old config + half the new weights in output_dir

    def loads_as(expected):
        got = adapter_tensors(PeftModel.from_pretrained(Classifier(), str(out)))
        assert all(torch.equal(got[k], expected[k]) for k in expected)

    loads_as(old)
    trainer.save_model()
    loads_as(new)
    assert (out / "checkpoint-7" / "optimizer.pt").read_bytes() == b"state" and (out / "training_args.bin").is_file()
    assert sorted(os.listdir(tmp_path)) == ["half", "run"]


def test_resume_true_skips_a_checkpoint_killed_while_being_written(tmp_path):
    out = tmp_path / "run"
    steps = dict(save_strategy="steps", save_steps=1, lr_scheduler_type="constant")

    def child(flag):
        trainer = trainer_for(out, **steps)
        write = trainer._save_optimizer_and_scheduler

        def slow(output_dir):
            if output_dir.endswith("checkpoint-2"):  # the second checkpoint: adapter written, optimizer half-way
                with open(os.path.join(output_dir, "optimizer.pt"), "wb") as f:
                    f.write(b"\x80half")
                open(flag, "w").close()
                time.sleep(120)
            write(output_dir)

        trainer._save_optimizer_and_scheduler = slow
        trainer.train()

    kill_mid_write(tmp_path / "half", child)
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoint-2" / "trainer_state.json").exists()
    trainer = trainer_for(out, **steps)
    with pytest.warns(UserWarning, match=r"skipping checkpoint-2 .*interrupted while being written.*from checkpoint-1"):
        trainer.train(resume_from_checkpoint=True)  # transformers takes checkpoint-2: FileNotFoundError on its state
    assert trainer.state.global_step == 2
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_resume_true_without_a_complete_checkpoint_says_what_to_do(tmp_path):
    from trainer_ext.trainer import last_complete_checkpoint

    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text('{"global_st')
    with pytest.raises(ValueError, match=r"no complete checkpoint \(checkpoint-3 lack.*pass the path of a checkpoint"):
        last_complete_checkpoint(str(tmp_path))
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1}')
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-1")
    assert any("skipping checkpoint-3" in str(w.message) for w in seen)


# ---------------------------------------------------------------------------------------------------------- recipes
def test_tinyllama_cache_rebuild_killed_midway_keeps_the_previous_model(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))
    import tinyllama

    def fake_pretrain(spec, texts, out_dir, progress=True, flag=None):  # the real one trains for seconds
        open(os.path.join(out_dir, "model.safetensors"), "w").write("w" * 10)
        if flag:
            open(flag, "w").close()
            time.sleep(120)
        report = {"params": 1, "first_loss": 1.0, "final_loss": 0.5, "train_tokens": 1, "seconds": 0}
        open(os.path.join(out_dir, "pretrain.json"), "w").write(json.dumps(report))
        return report

    monkeypatch.setattr(tinyllama, "pretrain", fake_pretrain)
    cache = str(tmp_path / "cache")
    path = tinyllama.tiny_llama(cache, texts=["a b c"], log=lambda *a: None)

    def child(flag):
        tinyllama.pretrain = lambda *a, **k: fake_pretrain(*a, **k, flag=flag)
        tinyllama.tiny_llama(cache, texts=["a b c"], rebuild=True, log=lambda *a: None)

    kill_mid_write(tmp_path / "half", child)  # before: its ".tinyllama-*" temporary stayed forever
    assert sorted(os.listdir(path)) == ["model.safetensors", "pretrain.json"]
    assert len(os.listdir(cache)) == 2  # the entry and the killed build's temporary
    tinyllama.tiny_llama(cache, texts=["a b c"], rebuild=True, log=lambda *a: None)
    assert os.listdir(cache) == [os.path.basename(path)]
