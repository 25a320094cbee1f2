"""Hub round trips through the real huggingface_hub client against the local server of tests/hub_server.py.

Every adapter kind peft-ext produces is pushed, loaded back by repo id with PeftModel.from_pretrained and compared
with the in-memory model; the card's metadata and report tables are read back from the server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from peft import LoraConfig, PeftModel, get_peft_model

from peft_ext import (
    NullSpaceLoraConfig,
    OrthoSplitConfig,
    SubspaceLoraConfig,
    export_to_lora,
    initialize_nullspace_lora,
    set_ortho_alpha,
)
from peft_ext.cli import main
from peft_ext.hub import adapter_kind, pull_adapter, push_adapter, render_card

from .conftest import perturb_trainables, tiny_bert, token_batches

# ------------------------------------------------------------------------------------------ the server itself


def test_server_round_trip_through_the_real_client(hub_server, tmp_path):
    api = HfApi()
    url = api.create_repo("tester/demo")
    assert url.repo_id == "tester/demo" and url.startswith(hub_server.url)
    api.create_repo("tester/demo", exist_ok=True)  # 409 -> fine
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "a.txt").write_text("one")
    (tmp_path / "up" / "sub").mkdir()
    (tmp_path / "up" / "sub" / "b.txt").write_text("two")
    first = api.upload_folder(repo_id="tester/demo", folder_path=tmp_path / "up", commit_message="first")
    second = api.upload_file(repo_id="tester/demo", path_or_fileobj=b"uno", path_in_repo="a.txt")
    assert first.oid != second.oid and len(second.oid) == 40
    assert sorted(api.list_repo_files("tester/demo")) == [".gitattributes", "a.txt", "sub/b.txt"]
    assert open(hf_hub_download("tester/demo", "a.txt")).read() == "uno"
    assert open(hf_hub_download("tester/demo", "a.txt", revision=first.oid)).read() == "one"
    assert open(hf_hub_download("tester/demo", "sub/b.txt")).read() == "two"
    assert api.model_info("tester/demo").sha == second.oid
    assert api.model_info("tester/demo", revision=first.oid).sha == first.oid

    api.create_branch("tester/demo", branch="v1", revision=first.oid)
    assert {b.name for b in api.list_repo_refs("tester/demo").branches} == {"main", "v1"}
    assert open(hf_hub_download("tester/demo", "a.txt", revision="v1")).read() == "one"

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/nope", "a.txt")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("tester/demo", "a.txt", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("tester/demo", "missing.txt")
    assert not api.file_exists("tester/demo", "missing.txt") and api.file_exists("tester/demo", "a.txt")
    assert api.whoami()["name"] == "tester"
    api.delete_repo("tester/demo")
    assert hub_server.repo_ids() == SEEDED


def test_server_paginates_commits_atomically_and_guards_access(hub_server):
    api = HfApi()
    api.create_repo("tester/paged", private=True)
    ops = [CommitOperationAdd(path_in_repo=f"f{i}.txt", path_or_fileobj=str(i).encode()) for i in range(5)]
    head = api.create_commit("tester/paged", ops, commit_message="five").oid
    hub_server.state.page_size = 2
    assert len(list(api.list_repo_tree("tester/paged"))) == 6  # 3 pages, through Link headers
    bad = [CommitOperationAdd(path_in_repo="g.txt", path_or_fileobj=b"g"), CommitOperationDelete("absent.txt")]
    with pytest.raises(EntryNotFoundError):
        api.create_commit("tester/paged", bad, commit_message="half")
    assert "g.txt" not in hub_server.files("tester/paged") and api.model_info("tester/paged").sha == head
    with pytest.raises(HfHubHTTPError, match="412"):
        api.create_commit("tester/paged", [CommitOperationAdd(path_in_repo="h.txt", path_or_fileobj=b"h")],
                          commit_message="stale", parent_commit="0" * 40)
    with pytest.raises(RepositoryNotFoundError):  # private: invisible without the owner's token
        HfApi(token=False).model_info("tester/paged")
    hub_server.require_token = True
    with pytest.raises(HfHubHTTPError, match="401"):
        HfApi(token=False).list_repo_refs("tester/paged")


# ------------------------------------------------------------------------------------------ adapters on the Hub

BASE = "tester/tiny-bert"  # the Hub id the cards name; the weights come from tiny_bert() (seeded)
BASE_V2 = "tester/tiny-bert-v2"  # the LoRA-X report's target base
SEEDED = [BASE, BASE_V2]
BATCH = token_batches(n_batches=1, seed=7)[0]


@pytest.fixture
def hub_server(hub_server):
    """The conftest server with the base models the adapters name (a push checks that its base exists on the server
    and takes the license from its card), stored without requests."""
    hub_server.add_repo(BASE, {"README.md": b"---\nlicense: apache-2.0\n---\n# tiny BERT\n"})
    hub_server.add_repo(BASE_V2, {"README.md": b"---\nlicense: apache-2.0\n---\n# tiny BERT v2\n"})
    return hub_server


def _outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**BATCH).last_hidden_state


def _nullspace(tmp_path, name="ns", seed=0, mode="v2"):
    """A calibrated, then perturbed NullSpaceLoRA adapter saved to tmp_path/name; (model, dir, report)."""
    model = get_peft_model(tiny_bert(), NullSpaceLoraConfig(r=4, target_modules=["query", "value"], mode=mode))
    report = initialize_nullspace_lora(model, token_batches(), progress=False, warn=False)
    perturb_trainables(model, seed=seed)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name, report


def _lora_with_lorax_report(tmp_path):
    """A plain LoRA folder plus a hand-written lorax_report.json in the LoRA-X converter's schema."""
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    perturb_trainables(model, seed=3)
    model.save_pretrained(tmp_path / "lorax")
    layers = [{"name": f"encoder.layer.{i}.attention.self.{m}", "shape": [32, 32], "phi_u": 0.91, "phi_v": 0.87,
               "energy_kept": 0.95, "rank": 4, "action": "transferred"} for i in range(2) for m in ("query", "value")]
    report = {"method": "lorax", "source_base": "tester/tiny-bert-v1", "target_base": "tester/tiny-bert-v2",
              "adapter": "tester/source-adapter", "settings": {"subspace_rank": 16, "carry_complement": True},
              "layers": layers,
              "summary": {"layers": 4, "transferred": 4, "dropped": 0, "copied": 0, "mean_phi_u": 0.91,
                          "mean_phi_v": 0.87, "energy_kept": 0.95},
              "baselines": {"copy": {"energy_kept": 1.0}, "delta-sigma": {"energy_kept": 0.42}}}
    (tmp_path / "lorax" / "lorax_report.json").write_text(json.dumps(report))
    return model, tmp_path / "lorax"


def _adapter(kind, tmp_path):
    """(in-memory model, adapter dir, push kwargs, expected card kind, expected base, method tag, card snippets)."""
    if kind == "nullspace_lora":
        model, folder, report = _nullspace(tmp_path)
        return model, folder, {"report": report}, BASE, "nullspace-lora", ["import peft_ext", "‖Ax‖/‖x‖ held-out",
                                                                            "`encoder.layer.1.attention.self.value`"]
    if kind == "lora_export":
        ns, _, _ = _nullspace(tmp_path, mode="split")
        folder = Path(export_to_lora(ns, tmp_path / "export"))
        assert adapter_kind(folder) == "lora_export"  # from the peft_ext_export.json marker export_to_lora writes
        return ns, folder, {}, BASE, "lora", ["(no SVD, no truncation)", "no `import peft_ext` is needed",
                                              "`NULLSPACE_LORA`"]
    if kind == "subspace_lora":
        model = get_peft_model(tiny_bert(), SubspaceLoraConfig(k=4, target_modules=["query", "value"]))
        perturb_trainables(model, seed=1)
        model.save_pretrained(tmp_path / "sub")
        return model, tmp_path / "sub", {}, BASE, "subspace-lora", ["import peft_ext", "`k`"]
    if kind == "ortho_split":  # the base stream is rebuilt on load from the (same, seeded) base model's weights
        model = get_peft_model(tiny_bert(), OrthoSplitConfig(target_modules=["query", "value"], base_kind="int4"))
        set_ortho_alpha(model, 0.5)
        model.save_pretrained(tmp_path / "ortho")
        set_ortho_alpha(model, 1.0)  # a fresh load runs at alpha=1
        return model, tmp_path / "ortho", {}, BASE, "orthosplit", ["import peft_ext", "`base_kind` | `int4`",
                                                                    "set_ortho_alpha(model, 0.0)"]
    model, folder = _lora_with_lorax_report(tmp_path)
    return model, folder, {"base_model": None}, "tester/tiny-bert-v2", "lora-x", [
        "`tester/tiny-bert-v1`", "| `encoder.layer.0.attention.self.query` | 32×32 | 0.910 | 0.870 | 0.950 | 4 | "
        "transferred |", "delta-sigma 0.420"]


@pytest.mark.parametrize("kind", ["nullspace_lora", "lora_export", "subspace_lora", "ortho_split", "lorax"])
def test_push_then_load_by_repo_id(hub_server, tmp_path, kind):
    model, folder, kwargs, base, tag, snippets = _adapter(kind, tmp_path)
    kwargs = {"base_model": BASE, **kwargs}
    repo_id = f"tester/{kind.replace('_', '-')}"
    before = sorted(p.name for p in folder.iterdir())
    info = push_adapter(folder, repo_id, calibration="4 batches of random tokens", **kwargs)
    assert sorted(p.name for p in folder.iterdir()) == before  # the user's folder is never modified
    assert [c.title for c in hub_server.history(repo_id)] == [info.commit_message, "initial commit"]  # one commit

    loaded = PeftModel.from_pretrained(tiny_bert(), repo_id)
    assert torch.allclose(_outputs(loaded), _outputs(model), atol=1e-6)

    card = ModelCard.load(repo_id)
    assert card.data.library_name == "peft" and card.data.base_model == base and card.data.license == "apache-2.0"
    assert {"peft", "peft-ext", tag, f"base_model:adapter:{base}"} <= set(card.data.tags)
    assert f'PeftModel.from_pretrained(base, "{repo_id}")' in card.text and "4 batches of random tokens" in card.text
    for snippet in snippets:
        assert snippet in card.text, snippet
    if kind == "nullspace_lora":
        assert json.loads(hub_server.files(repo_id)["nullspace_report.json"]) == kwargs["report"].to_dict()
    # the same card offline, given the license the push read from the base's card on the server
    assert str(card) == str(render_card(folder, repo_id=repo_id, calibration="4 batches of random tokens",
                                        license="apache-2.0", **kwargs))


def test_versions_branches_and_stale_files(hub_server, tmp_path):
    repo_id = "tester/versions"
    old, folder, report = _nullspace(tmp_path, "v1", seed=0)
    first = push_adapter(folder, repo_id, base_model=BASE, report=report)
    new, folder2, report2 = _nullspace(tmp_path, "v2", seed=5)
    second = push_adapter(folder2, repo_id, base_model=BASE, report=report2)
    assert not torch.allclose(_outputs(old), _outputs(new), atol=1e-4)
    assert torch.allclose(_outputs(PeftModel.from_pretrained(tiny_bert(), repo_id)), _outputs(new), atol=1e-6)
    by_sha = PeftModel.from_pretrained(tiny_bert(), repo_id, revision=first.oid)
    assert torch.allclose(_outputs(by_sha), _outputs(old), atol=1e-6)

    export_to_lora(old, tmp_path / "plain")  # a new branch, from main; the NullSpaceLoRA report must not linger
    push_adapter(tmp_path / "plain", repo_id, base_model=BASE, revision="plain", kind="lora_export")
    assert "nullspace_report.json" not in hub_server.files(repo_id, "plain")
    assert "nullspace_report.json" in hub_server.files(repo_id, "main")
    assert hub_server.repo(repo_id).refs["main"] == second.oid
    plain = PeftModel.from_pretrained(tiny_bert(), repo_id, revision="plain")
    assert torch.allclose(_outputs(plain), _outputs(old), atol=1e-6)

    pr = push_adapter(folder, repo_id, base_model=BASE, create_pr=True)
    assert pr.pr_url and hub_server.repo(repo_id).refs["main"] == second.oid
    pulled = pull_adapter(repo_id, revision=first.oid, local_dir=tmp_path / "pulled")
    assert sorted(f for f in os.listdir(pulled) if not f.startswith(".")) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "nullspace_report.json"]
    assert Path(pulled, "adapter_model.safetensors").read_bytes() == (folder / "adapter_model.safetensors").read_bytes()


def test_private_push_is_invisible_without_the_token(hub_server, tmp_path):
    _, folder, _ = _nullspace(tmp_path)
    push_adapter(folder, "peft-ext-org/private-ns", base_model=BASE, private=True)
    assert hub_server.repo("peft-ext-org/private-ns").private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("peft-ext-org/private-ns")


def test_bad_input_is_refused_before_any_request(hub_server, tmp_path):
    _, folder, _ = _nullspace(tmp_path)
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    torch.save({"w": torch.zeros(1)}, pickled / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"pickle.*safe_serialization=True"):
        push_adapter(pickled, "tester/pickled", base_model=BASE)
    no_config = tmp_path / "no_config"
    shutil.copytree(folder, no_config)
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        push_adapter(no_config, "tester/no-config", base_model=BASE)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(folder, no_weights)
    (no_weights / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        push_adapter(no_weights, "tester/corrupt", base_model=BASE)
    unknown = tmp_path / "unknown"
    shutil.copytree(folder, unknown)
    cfg = json.loads((unknown / "adapter_config.json").read_text())
    (unknown / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "NULLSPACE_FOO"}))
    with pytest.raises(ValueError, match="NULLSPACE_FOO.*import peft_ext"):
        push_adapter(unknown, "tester/unknown", base_model=BASE)
    for bad in ("no-namespace", "a/b/c", "bad--name/x", "tester/has space", "", None):
        with pytest.raises(ValueError, match="repo_id=.*namespace/name"):
            push_adapter(folder, bad, base_model=BASE)
    with pytest.raises(ValueError, match="revision=.*commit sha"):
        push_adapter(folder, "tester/ok", base_model=BASE, revision="a" * 40)
    with pytest.raises(ValueError, match="base_model=.*not a Hub model id"):
        push_adapter(folder, "tester/ok", base_model=str(tmp_path))
    assert hub_server.requests == [] and hub_server.repo_ids() == SEEDED


def test_cli_card_and_push(hub_server, tmp_path, capsys):
    _, folder, report = _nullspace(tmp_path)
    report.save_json(str(tmp_path / "report.json"))
    common = ["--base-model", BASE, "--calibration", "random tokens", "--report", str(tmp_path / "report.json")]
    assert main(["card", str(folder), "--out", str(tmp_path / "README.md"), *common]) == 1  # offline: no license known
    assert "license=None and no license is known" in capsys.readouterr().err
    assert main(["card", str(folder), "--out", str(tmp_path / "README.md"), "--license", "mit", *common]) == 0
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == BASE and "nullspace-lora" in card.data.tags and "λmin/λmax" in card.text
    assert card.data.license == "mit"
    assert main(["push", str(folder), "tester/cli", "--revision", "exp", "--message", "from the CLI", *common]) == 0
    assert "tester/cli (exp)" in capsys.readouterr().out
    assert hub_server.history("tester/cli", "exp")[0].title == "from the CLI"
    assert "adapter_config.json" not in hub_server.files("tester/cli", "main")  # the branch got it, not main
    assert ModelCard(hub_server.files("tester/cli", "exp")["README.md"].decode()).data.license == "apache-2.0"
    capsys.readouterr()
    assert main(["push", str(folder), "tester/cli", "--base-model", "tester/nowhere"]) == 1
    assert "--no-check-base" in capsys.readouterr().err
    assert main(["push", str(folder), "tester/cli2", "--base-model", "tester/nowhere", "--no-check-base",
                 "--license", "mit"]) == 0
    capsys.readouterr()
    assert main(["push", str(tmp_path), "tester/cli"]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(r"peft-ext: error: .*has no adapter_config.json.*\n", err), err


@pytest.mark.skipif(not os.environ.get("HF_TOKEN_REAL_HUB"),
                    reason="real Hub round trip: opt in with HF_TOKEN_REAL_HUB=<a write token> (pushes a private "
                           "repo to the token's namespace and deletes it)")
def test_real_hub_round_trip(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", os.environ["HF_TOKEN_REAL_HUB"])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    model, folder, report = _nullspace(tmp_path)
    api = HfApi()
    repo_id = f"{api.whoami()['name']}/peft-ext-hub-test-{uuid.uuid4().hex[:8]}"
    try:
        push_adapter(folder, repo_id, private=True, base_model="google-bert/bert-base-uncased", report=report)
        loaded = PeftModel.from_pretrained(tiny_bert(), repo_id)
        assert torch.allclose(_outputs(loaded), _outputs(model), atol=1e-6)
    finally:
        api.delete_repo(repo_id, missing_ok=True)


# ------------------------------------------------------------------------------------------ data safety and faults
# Issue 13: nothing a user owns is lost, corrupted or leaked by a push or a pull, and every failure is one clear line.


def _raw_repo(repo_id: str, files: dict[str, bytes]) -> str:
    """A repo holding exactly `files`, committed with the plain client (no peft-ext validation); its head sha."""
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    return api.create_commit(repo_id, [CommitOperationAdd(path_in_repo=p, path_or_fileobj=d) for p, d in files.items()],
                             commit_message="raw").oid


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every non-hidden file under `folder` (relative POSIX name -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def _leftovers(folder: Path) -> list[str]:
    """Hidden siblings a complete-or-absent write of `folder` may leave behind (its temp folders)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def _resolve_gets(server) -> list[str]:
    """Downloads, but not of the seeded base models' cards (a push reads the base's license there)."""
    return [path for method, path in server.requests if method == "GET" and "/resolve/" in path
            and not any(path.startswith(f"/{base}/") for base in SEEDED)]


def _pushed_config(folder: Path, base: str = BASE) -> bytes:
    """adapter_config.json as a push uploads it: naming the base by its Hub id (the folder keeps its own)."""
    raw = (folder / "adapter_config.json").read_bytes()
    config = json.loads(raw)
    if config.get("base_model_name_or_path") == base:
        return raw
    return json.dumps({**config, "base_model_name_or_path": base}, indent=2, sort_keys=True).encode()


@pytest.fixture
def fast_retries(monkeypatch):
    """Idempotent requests are still retried, with waits short enough for a test."""
    import peft_ext.hub as hub

    monkeypatch.setattr(hub, "RETRY_WAITS", (0.05, 0.05))


def test_push_never_follows_a_link_out_of_the_folder(hub_server, tmp_path):
    _, folder, _ = _nullspace(tmp_path)
    outside = tmp_path / "home"
    outside.mkdir()
    (outside / "token").write_text("hf_secret_token_of_the_user")
    (outside / "dir").mkdir()
    (outside / "dir" / "x.json").write_text("{}")

    leak = tmp_path / "leak"
    shutil.copytree(folder, leak)
    (leak / "notes.txt").symlink_to(outside / "token")
    with pytest.raises(ValueError, match=r"'notes.txt' is a link to .*outside the folder.*copy the file in"):
        push_adapter(leak, "tester/leak", base_model=BASE)
    (leak / "notes.txt").unlink()
    (leak / "extra").symlink_to(outside / "dir")
    with pytest.raises(ValueError, match=r"'extra' is a link to a directory"):
        push_adapter(leak, "tester/leak", base_model=BASE)
    (leak / "extra").unlink()
    (leak / "sub").mkdir()
    (leak / "sub" / "weights.safetensors").symlink_to(folder / "adapter_model.safetensors")  # another folder
    with pytest.raises(ValueError, match=r"'sub/weights.safetensors' is a link"):
        push_adapter(leak, "tester/leak", base_model=BASE)
    shutil.rmtree(leak / "sub")
    (leak / "broken.json").symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(ValueError, match=r"'broken.json' is a link to .*which does not exist"):
        push_adapter(leak, "tester/leak", base_model=BASE)
    (leak / "broken.json").unlink()
    os.mkfifo(leak / "pipe.json")  # opening it for the upload would block forever
    with pytest.raises(ValueError, match=r"'pipe.json' is not a regular file"):
        push_adapter(leak, "tester/leak", base_model=BASE)
    (leak / "pipe.json").unlink()
    assert hub_server.requests == []

    (leak / ".env").write_text("HF_TOKEN=hf_secret_token_of_the_user")
    (leak / "env.json").symlink_to(".env")  # inside the folder, but hidden: not uploaded under another name either
    with pytest.raises(ValueError, match=r"'env.json' is a link to the hidden '.env'"):
        push_adapter(leak, "tester/leak", base_model=BASE)
    (leak / "env.json").unlink()
    assert hub_server.requests == []

    # a link inside the folder to a file inside it is uploaded with the target's content; hidden entries never are
    (leak / "config_copy.json").symlink_to("adapter_config.json")
    (leak / ".token").symlink_to(outside / "token")
    push_adapter(leak, "tester/leak", base_model=BASE)
    files = hub_server.files("tester/leak")
    assert files["config_copy.json"] == (folder / "adapter_config.json").read_bytes()
    assert not any(b"hf_secret_token_of_the_user" in data for data in files.values())
    assert ".token" not in files


def _truncate_data(path: Path, drop: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-drop])


def test_push_validates_the_whole_safetensors_file(hub_server, tmp_path):
    _, folder, _ = _nullspace(tmp_path)
    cut = tmp_path / "cut"
    shutil.copytree(folder, cut)
    _truncate_data(cut / "adapter_model.safetensors", 7)  # the header is intact, the last tensor is short
    with pytest.raises(ValueError, match=r"adapter_model.safetensors.*truncated.*7 bytes short.*save_pretrained"):
        push_adapter(cut, "tester/cut", base_model=BASE)
    padded = tmp_path / "padded"
    shutil.copytree(folder, padded)
    with open(padded / "adapter_model.safetensors", "ab") as f:
        f.write(b"\0" * 5)
    with pytest.raises(ValueError, match=r"5 bytes after the last tensor"):
        push_adapter(padded, "tester/padded", base_model=BASE)
    from safetensors.torch import save_file

    lying = tmp_path / "lying"  # a tensor whose offsets do not match its dtype and shape
    shutil.copytree(folder, lying)
    save_file({"w": torch.zeros(2, 3)}, str(lying / "adapter_model.safetensors"))
    raw = (lying / "adapter_model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].replace(b'"shape":[2,3]', b'"shape":[3,3]')
    (lying / "adapter_model.safetensors").write_bytes(raw[:8] + header + raw[8 + n:])
    with pytest.raises(ValueError, match=r"tensor 'w' \(F32, shape \[3, 3\]\) needs 36 bytes but its offsets span 24"):
        push_adapter(lying, "tester/lying", base_model=BASE)
    extra = tmp_path / "extra"  # every safetensors file of the upload is checked, not only the adapter weights
    shutil.copytree(folder, extra)
    (extra / "other").mkdir()
    shutil.copy(cut / "adapter_model.safetensors", extra / "other" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"other/adapter_model.safetensors.*truncated"):
        push_adapter(extra, "tester/extra", base_model=BASE)
    (extra / "other" / "adapter_model.safetensors").unlink()
    (extra / "other" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"other/adapter_config.json is not valid JSON"):
        push_adapter(extra, "tester/extra", base_model=BASE)
    assert hub_server.requests == []


def test_push_and_card_arguments_are_checked(hub_server, tmp_path):
    _, folder, report = _nullspace(tmp_path)
    for kwargs, pattern in [
        ({"timeout": 0}, r"timeout=0 .*positive number of seconds"),
        ({"timeout": float("nan")}, r"timeout=nan"),
        ({"timeout": None}, r"timeout=None"),
        ({"timeout": "10"}, r"timeout='10'"),
        ({"private": "no"}, r"private='no' .*True or False"),
        ({"create_pr": 1}, r"create_pr=1 .*True or False"),
        ({"license": "Apache 2.0"}, r"license='Apache 2.0' .*apache-2.0"),
        ({"extra_tags": "nlp"}, r"extra_tags='nlp' .*list of tag strings"),
        ({"extra_tags": ["ok", "two\nlines"]}, r"extra_tags\[1\]="),
        ({"commit_message": ""}, r"commit_message='' "),
        ({"calibration": 5}, r"calibration=5 .*one line"),
    ]:
        with pytest.raises((ValueError, TypeError), match=pattern):
            push_adapter(folder, "tester/args", base_model=BASE, **kwargs)
    (tmp_path / "bad_report.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad_report.json is not valid JSON .*report.save_json"):
        render_card(folder, base_model=BASE, report=tmp_path / "bad_report.json")
    data = report.to_dict()
    data["layers"][0]["eig_ratio"] = "small"
    with pytest.raises(ValueError, match=r"layers\[0\]\['eig_ratio'\]='small' .*number"):
        render_card(folder, base_model=BASE, report=data)
    data = report.to_dict()
    data["layers"][1] = "encoder.layer.0"
    with pytest.raises(ValueError, match=r"layers\[1\] is 'encoder.layer.0', not an object"):
        render_card(folder, base_model=BASE, report=data)
    (folder / "adapter_config.json").write_bytes(b'{"peft_type": "\xff"}')
    with pytest.raises(ValueError, match=r"adapter_config.json is not UTF-8"):
        render_card(folder, base_model=BASE)
    assert hub_server.requests == []


def test_pull_validates_the_whole_set_before_anything_reaches_local_dir(hub_server, tmp_path):
    _, folder, _ = _nullspace(tmp_path)
    push_adapter(folder, "tester/good", base_model=BASE)
    copy = tmp_path / "copy"
    pull_adapter("tester/good", local_dir=copy)
    before = _snapshot(copy)
    assert before == _snapshot(folder) | {"README.md": hub_server.files("tester/good")["README.md"],
                                          "adapter_config.json": _pushed_config(folder)}

    config = (folder / "adapter_config.json").read_bytes()
    weights = (folder / "adapter_model.safetensors").read_bytes()
    bad = {
        "no-config": ({"README.md": b"# x", "adapter_model.safetensors": weights}, r"has no adapter_config.json"),
        "no-weights": ({"README.md": b"# x", "adapter_config.json": config}, r"has adapter_config.json but no "
                       r"adapter_model.safetensors"),
        "pickle-only": ({"adapter_config.json": config, "adapter_model.bin": b"pickle"},
                        r"only pickle weights \['adapter_model.bin'\].*never downloads"),
        "truncated": ({"adapter_config.json": config, "adapter_model.safetensors": weights[:-9]},
                      r"adapter_model.safetensors.*truncated"),
        "bad-config": ({"adapter_config.json": b'{"peft_type": "LORA", "layers_pattern": "layers"}',
                        "adapter_model.safetensors": weights}, r"does not load as LoraConfig: When `layers_pattern`"),
        "unknown-type": ({"adapter_config.json": b'{"peft_type": "NULLSPACE_FOO"}',
                          "adapter_model.safetensors": weights}, r"peft_type='NULLSPACE_FOO', which PEFT cannot load"),
        "bad-json": ({"adapter_config.json": config, "adapter_model.safetensors": weights,
                      "nullspace_report.json": b"{cut"}, r"nullspace_report.json is not valid JSON"),
    }
    for name, (files, pattern) in bad.items():
        _raw_repo(f"tester/{name}", files)
        gets = len(_resolve_gets(hub_server))
        with pytest.raises(ValueError, match=f"tester/{name}.*{pattern}"):
            pull_adapter(f"tester/{name}", local_dir=copy)
        assert _snapshot(copy) == before and _leftovers(copy) == [], name
        with pytest.raises(ValueError, match=pattern):
            pull_adapter(f"tester/{name}", local_dir=tmp_path / f"new-{name}")
        assert not (tmp_path / f"new-{name}").exists() and _leftovers(tmp_path / f"new-{name}") == []
        if name in ("no-config", "no-weights", "pickle-only"):  # refused from the file list: nothing downloaded
            assert len(_resolve_gets(hub_server)) == gets, name


def test_pull_refuses_a_local_dir_it_would_destroy(hub_server, tmp_path):
    _, folder, _ = _nullspace(tmp_path)
    push_adapter(folder, "tester/good", base_model=BASE)
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("my project")
    (project / "train.py").write_text("print('hi')")
    with pytest.raises(ValueError, match=r"local_dir=.*project.* holds \['train.py'\].*new or empty folder"):
        pull_adapter("tester/good", local_dir=project)
    (project / "train.py").unlink()
    with pytest.raises(ValueError, match=r"local_dir=.*project.* is not an adapter copy \(no adapter_config.json\)"):
        pull_adapter("tester/good", local_dir=project)
    (project / ".git").mkdir()
    shutil.copy(folder / "adapter_config.json", project)
    with pytest.raises(ValueError, match=r"holds \['.git'\]"):
        pull_adapter("tester/good", local_dir=project)
    with pytest.raises(ValueError, match=r"local_dir=.*README.md.* is a file"):
        pull_adapter("tester/good", local_dir=project / "README.md")
    assert sorted(p.name for p in project.iterdir()) == [".git", "README.md", "adapter_config.json"]
    assert _resolve_gets(hub_server) == []

    # a symlinked local_dir keeps its link; the folder it points to is what gets replaced
    real = tmp_path / "real"
    pull_adapter("tester/good", local_dir=real)
    (tmp_path / "link").symlink_to(real)
    assert pull_adapter("tester/good", local_dir=tmp_path / "link") == str(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and _snapshot(tmp_path / "link") == _snapshot(real)


def test_pull_faults_leave_the_previous_copy(hub_server, tmp_path, fast_retries):
    old, folder, _ = _nullspace(tmp_path, "v1", seed=0)
    push_adapter(folder, "tester/faulty", base_model=BASE)
    copy = tmp_path / "copy"
    pull_adapter("tester/faulty", local_dir=copy)
    before = _snapshot(copy)
    new, folder2, _ = _nullspace(tmp_path, "v2", seed=5)
    push_adapter(folder2, "tester/faulty", base_model=BASE)
    weights = r"/resolve/[0-9a-f]{40}/adapter_model.safetensors$"

    hub_server.inject("500", "GET", weights)
    with pytest.raises(OSError, match=rf"{hub_server.url} answered 500 to GET .*adapter_model.safetensors \(3 tries\)"
                                      r".*nothing was written to local_dir"):
        pull_adapter("tester/faulty", local_dir=copy)
    assert _snapshot(copy) == before and _leftovers(copy) == []
    hub_server.clear_faults()
    hub_server.inject("short", "GET", weights)
    with pytest.raises(OSError, match=r"downloading adapter_model.safetensors from .* failed: Consistency check "
                                      r"failed.*nothing was written to local_dir"):
        pull_adapter("tester/faulty", local_dir=copy)
    assert _snapshot(copy) == before and _leftovers(copy) == []
    hub_server.clear_faults()
    hub_server.inject("stall", "GET", r"^/api/models/tester/faulty$")
    with pytest.raises(TimeoutError, match=rf"{hub_server.url} did not answer GET /api/models/tester/faulty within "
                                           r"timeout=0.3 s \(3 tries\).*pass a larger timeout="):
        pull_adapter("tester/faulty", local_dir=copy, timeout=0.3)
    assert _snapshot(copy) == before

    hub_server.clear_faults()
    once = hub_server.inject("500", "GET", weights, times=1)  # a transient 500 is retried
    pull_adapter("tester/faulty", local_dir=copy)
    assert once.hits == 1 and _snapshot(copy)["adapter_model.safetensors"] == (
        folder2 / "adapter_model.safetensors").read_bytes()
    loaded = PeftModel.from_pretrained(tiny_bert(), copy)
    assert torch.allclose(_outputs(loaded), _outputs(new), atol=1e-6)


def test_pull_killed_mid_download_keeps_the_previous_copy(hub_server, tmp_path):
    import subprocess
    import sys
    import time

    old, folder, _ = _nullspace(tmp_path, "v1", seed=0)
    push_adapter(folder, "tester/killed", base_model=BASE)
    copy = tmp_path / "copy"
    pull_adapter("tester/killed", local_dir=copy)
    before = _snapshot(copy)
    _, folder2, _ = _nullspace(tmp_path, "v2", seed=5)
    push_adapter(folder2, "tester/killed", base_model=BASE)
    # the child gets half of the new weights, then the server holds the connection: it is mid-download when killed
    fault = hub_server.inject("stall_body", "GET", r"/resolve/[0-9a-f]{40}/adapter_model.safetensors$", seconds=60)
    code = f"from peft_ext.hub import pull_adapter\npull_adapter('tester/killed', local_dir={str(copy)!r})\n"
    log = tmp_path / "child.log"  # a file, not a pipe: a full pipe would block the child before the download
    with open(log, "wb") as out:
        child = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ), stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 120
        while fault.hits == 0 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fault.hits == 1, f"the child never started the download: {log.read_text()[-2000:]}"
        time.sleep(0.3)  # let the first half of the body land on disk
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -9
    assert _snapshot(copy) == before  # the previous copy, byte for byte, in its place
    loaded = PeftModel.from_pretrained(tiny_bert(), copy)  # loads (peft_ext is imported by this module)
    assert torch.allclose(_outputs(loaded), _outputs(old), atol=1e-6)
    hub_server.clear_faults()  # the next pull completes, and removes what the killed one left beside the copy
    pull_adapter("tester/killed", local_dir=copy)
    assert _snapshot(copy)["adapter_model.safetensors"] == (folder2 / "adapter_model.safetensors").read_bytes()
    assert _leftovers(copy) == []


def test_push_timeouts_and_retries(hub_server, tmp_path, fast_retries):
    import time

    _, folder, _ = _nullspace(tmp_path)
    hub_server.inject("stall", "POST", r"^/api/repos/create$", seconds=5)
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        push_adapter(folder, "tester/stalled", base_model=BASE, timeout=0.3)
    assert time.monotonic() - start < 4  # three tries of 0.3 s, not the 5 s the server holds each one
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{hub_server.url} did not answer POST /api/repos/create within "
                                                      "timeout=0.3 s (3 tries)")
    assert "nothing was committed" in message and "pass a larger timeout=" in message
    assert hub_server.repo_ids() == SEEDED

    hub_server.clear_faults()
    once = hub_server.inject("stall", "POST", r"^/api/repos/create$", times=1)
    push_adapter(folder, "tester/stalled", base_model=BASE, timeout=0.3)  # the retry gets through
    assert once.hits == 1 and "adapter_config.json" in hub_server.files("tester/stalled")

    # the commit is not idempotent, so it is not retried; the error says whether anything landed
    _, folder2, _ = _nullspace(tmp_path, "v2", seed=5)
    head = hub_server.repo("tester/stalled").refs["main"]
    hub_server.inject("stall", "POST", r"/commit/main$")
    with pytest.raises(TimeoutError, match=r"did not answer POST /api/models/tester/stalled/commit/main within "
                                           r"timeout=0.3 s \(1 try\); nothing was committed \(main is still at"):
        push_adapter(folder2, "tester/stalled", base_model=BASE, timeout=0.3, commit_message="second")
    assert hub_server.repo("tester/stalled").refs["main"] == head
    hub_server.clear_faults()
    push_adapter(folder2, "tester/stalled", base_model=BASE, commit_message="second")
    assert hub_server.history("tester/stalled")[0].title == "second"


def test_unreachable_server_is_one_line(hub_server, tmp_path, fast_retries, monkeypatch):
    import socket

    from huggingface_hub import constants

    _, folder, _ = _nullspace(tmp_path)
    with socket.socket() as s:  # a port nobody listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    with pytest.raises(OSError) as info:
        push_adapter(folder, "tester/nowhere", base_model=BASE)
    # the first request of a push looks the base model up
    assert re.fullmatch(rf"could not talk to {closed} for GET /api/models/{BASE} \(ConnectError: .*; 3 tries\); "
                        r"nothing was committed; check the network and HF_ENDPOINT, then try again", str(info.value))
    with pytest.raises(OSError, match=rf"could not talk to {closed} for GET /api/models/tester/nowhere .*nothing was "
                                      r"written to local_dir"):
        pull_adapter("tester/nowhere", local_dir=tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_push_server_errors_and_concurrent_pushes(hub_server, tmp_path, fast_retries):
    import threading

    _, folder, _ = _nullspace(tmp_path, "a", seed=0)
    _, folder2, _ = _nullspace(tmp_path, "b", seed=5)
    push_adapter(folder, "tester/busy", base_model=BASE)
    head = hub_server.repo("tester/busy").refs["main"]
    hub_server.inject("500", "POST", r"/commit/main$")
    with pytest.raises(OSError, match=rf"{hub_server.url} answered 500 to POST .*/commit/main \(1 try\): injected "
                                      r"server error; nothing was committed"):
        push_adapter(folder2, "tester/busy", base_model=BASE)
    assert hub_server.repo("tester/busy").refs["main"] == head
    hub_server.clear_faults()
    hub_server.inject("500", "POST", r"/preupload/main$", times=1)  # huggingface_hub retries its preupload itself
    push_adapter(folder2, "tester/busy", base_model=BASE)
    assert hub_server.files("tester/busy")["adapter_model.safetensors"] == (
        folder2 / "adapter_model.safetensors").read_bytes()

    # two pushes that read the same head: one lands, the other is refused whole (never a mix of the two)
    _, folder3, _ = _nullspace(tmp_path, "c", seed=9)
    hub_server.clear_faults()
    # both read the head, then wait in their preupload long enough for the other to read the same head
    hub_server.inject("delay", "POST", r"/preupload/main$", seconds=1.5)
    results: dict[str, object] = {}

    def push(name, source):
        try:
            results[name] = push_adapter(source, "tester/busy", base_model=BASE, commit_message=name)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            results[name] = e

    threads = [threading.Thread(target=push, args=(n, f)) for n, f in (("a", folder), ("c", folder3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    failed = {n: r for n, r in results.items() if isinstance(r, Exception)}
    assert len(failed) == 1, results
    (name, error), = failed.items()
    assert isinstance(error, OSError) and re.search(r"main moved to [0-9a-f]{40} while pushing.*nothing was "
                                                    r"committed.*push again", str(error)), error
    winner = folder if name == "c" else folder3
    assert hub_server.history("tester/busy")[0].title != name
    files = hub_server.files("tester/busy")
    assert files["adapter_model.safetensors"] == (winner / "adapter_model.safetensors").read_bytes()
    assert files["adapter_config.json"] == _pushed_config(winner)


def test_a_pulled_cache_snapshot_can_be_pushed_again(hub_server, tmp_path):
    model, folder, _ = _nullspace(tmp_path)
    push_adapter(folder, "tester/source", base_model=BASE)
    snapshot = Path(pull_adapter("tester/source"))  # the hf cache: every file is a link into ../../blobs
    assert (snapshot / "adapter_model.safetensors").is_symlink()
    push_adapter(snapshot, "tester/copy", base_model=BASE)
    loaded = PeftModel.from_pretrained(tiny_bert(), "tester/copy")
    assert torch.allclose(_outputs(loaded), _outputs(model), atol=1e-6)
    # the snapshot's README.md is our card: the new push replaces our block in it, it does not nest a second one
    card = hub_server.files("tester/copy")["README.md"].decode()
    assert card.count("<!-- peft-ext card: begin") == 1 and card.count("## Method") == 1
    assert card.replace("copy", "source") == hub_server.files("tester/source")["README.md"].decode()


# ------------------------------------------------------------------------------------------ the Trainer and the Hub
# Issue 18 §3: a Trainer's folder pushes as it is (its training state skipped, never a pickle), the folder's own card
# is merged rather than replaced, the pushed config names the base by its Hub id, and the license comes from the base.

CLS_BASE = "tester/tiny-bert-cls"


def _trainer_folders(tmp_path):
    """A tiny PEFT LoRA on a BERT classifier saved to a local folder (so the adapter records a local base path),
    trained one step by a real Trainer with a tokenizer: (model, trainer, trainer.save_model() folder, checkpoint)."""
    from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification,
                              BertTokenizerFast, Trainer, TrainingArguments)

    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                        max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(base_dir)
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                                                  [f"w{i}" for i in range(59)]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    data = [{"input_ids": [2, 5 + i, 9, 3], "attention_mask": [1] * 4, "labels": i % 2} for i in range(4)]
    args = TrainingArguments(str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, save_steps=1,
                             learning_rate=1e-2, seed=3, report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    return model, trainer, base_dir, tmp_path / "final", tmp_path / "run" / "checkpoint-1"


def test_push_a_trainer_checkpoint_and_load_it_with_auto_peft_model(hub_server, tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    model, trainer, base_dir, final, checkpoint = _trainer_folders(tmp_path)
    local_base = json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert local_base == str(base_dir)
    assert {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            "tokenizer.json"} <= {p.name for p in checkpoint.iterdir()}
    before = _snapshot(checkpoint)

    # the base is known only as a local folder: nobody else could load the adapter by repo id
    with pytest.raises(ValueError, match=r"base_model_name_or_path='.*base', a local path: AutoPeftModel.* would fail "
                                         r"for everyone else; pass base_model='namespace/name' \(--base-model\)"):
        push_adapter(checkpoint, "tester/ckpt")
    with pytest.raises(ValueError, match=rf"base model 'tester/absent' is not a model repo on {hub_server.url} .*"
                                         r"--no-check-base"):
        push_adapter(checkpoint, "tester/ckpt", base_model="tester/absent")
    assert hub_server.repo_ids() == SEEDED  # refused before anything was created

    # the base on the server: its weights (what AutoPeftModel loads) and a card with its license
    hub_server.add_repo(CLS_BASE, {"config.json": (base_dir / "config.json").read_bytes(),
                                   "model.safetensors": (base_dir / "model.safetensors").read_bytes(),
                                   "README.md": b"---\nlicense: mit\n---\n# tiny classifier\n"})
    with pytest.warns(UserWarning, match=r"not uploading optimizer.pt, rng_state.pth, scheduler.pt, "
                                         r"trainer_state.json, training_args.bin: training state"):
        push_adapter(checkpoint, "tester/ckpt", base_model=CLS_BASE)
    assert _snapshot(checkpoint) == before  # the folder is never modified (its config keeps the local path)
    files = hub_server.files("tester/ckpt")
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth")) or f == "trainer_state.json"]
    assert {"tokenizer.json", "tokenizer_config.json", "adapter_model.safetensors"} <= set(files)
    assert json.loads(files["adapter_config.json"]) == {**json.loads(before["adapter_config.json"]),
                                                        "base_model_name_or_path": CLS_BASE}

    loaded = AutoPeftModelForSequenceClassification.from_pretrained("tester/ckpt")  # the base found by its Hub id
    batch = {"input_ids": torch.tensor([[2, 7, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(**batch).logits, model.eval()(**batch).logits, atol=1e-6)

    card = ModelCard.load("tester/ckpt")
    assert card.data.license == "mit"  # from the base's card, not a default
    assert card.data.base_model == CLS_BASE and card.data.pipeline_tag == "text-classification"
    assert "base_model:adapter:" + str(base_dir) not in card.data.tags  # PEFT's tag naming the local path
    assert "- train_batch_size: 4\n- training_steps: 1" in card.text  # from trainer_state.json (JSON, not the .bin)
    assert "[More Information Needed]" not in card.text  # PEFT's empty template text is dropped
    assert "- PEFT " in card.text and "- peft-ext " in card.text

    # the final save_model() folder, with the Trainer's own arguments for the hyperparameters
    with pytest.warns(UserWarning, match=r"not uploading training_args.bin: training state"):
        push_adapter(final, "tester/final", base_model=CLS_BASE, training_args=trainer.args, license="apache-2.0")
    card = ModelCard.load("tester/final")
    assert card.data.license == "apache-2.0"
    assert "- learning_rate: 0.01\n- train_batch_size: 4\n- eval_batch_size: 8\n- seed: 3" in card.text
    pulled = Path(pull_adapter("tester/final", local_dir=tmp_path / "pulled"))
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in pulled.iterdir()}


def test_push_refuses_pickles_it_does_not_know(hub_server, tmp_path):
    _, folder, _ = _nullspace(tmp_path)
    torch.save({"head": torch.zeros(2)}, folder / "my_head.pt")  # not a Trainer file: the user must decide
    with pytest.raises(ValueError, match=r"holds pickle files \['my_head.pt'\]"):
        push_adapter(folder, "tester/pickled", base_model=BASE)
    (folder / "my_head.pt").unlink()
    torch.save({"w": torch.zeros(1)}, folder / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model.bin next to adapter_model.safetensors: two copies.*Delete "
                                         r"adapter_model.bin"):
        push_adapter(folder, "tester/pickled", base_model=BASE)
    assert hub_server.requests == []


TRL_CARD = """---
base_model: HuggingFaceTB/SmolLM2-135M
datasets: trl-lib/Capybara
library_name: transformers
model_name: smol-sft
tags:
- generated_from_trainer
- trl
- sft
licence: license
pipeline_tag: text-generation
model-index:
- name: smol-sft
  results:
  - task:
      type: text-generation
    dataset:
      name: trl-lib/Capybara
      type: trl-lib/Capybara
    metrics:
    - type: loss
      value: 1.25
---

# Model Card for smol-sft

This model is a fine-tuned version of [HuggingFaceTB/SmolLM2-135M](https://huggingface.co/HuggingFaceTB/SmolLM2-135M).
It has been trained using [TRL](https://github.com/huggingface/trl).

## Training procedure

This model was trained with SFT.

### Framework versions

- TRL: 1.16.0
- Transformers: 5.24.0

## Citations

Cite TRL as: ...
"""


def test_card_merges_the_folder_card_trl_wrote(hub_server, tmp_path):
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    model.save_pretrained(tmp_path / "sft")
    folder = tmp_path / "sft"
    (folder / "README.md").write_text(TRL_CARD)  # as TRL's SFTTrainer writes it (trl/templates/lm_model_card.md)
    card = render_card(folder, base_model=BASE, license="apache-2.0", extra_tags=["my-tag"],
                       training_args={"learning_rate": 2e-4, "seed": 42})
    data = card.data
    # their metadata is kept; ours is set on top
    assert data.pipeline_tag == "text-generation" and data.datasets == "trl-lib/Capybara"
    assert data.eval_results[0].metric_value == 1.25 and data.model_name == "smol-sft"
    assert data.tags[:3] == ["generated_from_trainer", "trl", "sft"]
    assert {"peft", "peft-ext", "lora", "my-tag", f"base_model:adapter:{BASE}"} <= set(data.tags)
    assert data.library_name == "peft" and data.base_model == BASE and data.license == "apache-2.0"
    # their text leads, ours follows in the marked block; versions and hyperparameters go into their sections
    text = card.text
    assert text.index("# Model Card for smol-sft") < text.index("It has been trained using [TRL]") < \
        text.index("<!-- peft-ext card: begin") < text.index("## About this adapter: LoRA (peft-ext)")
    assert text.count("### Framework versions") == 1 and text.count("## Training procedure") == 1
    versions = text[text.index("### Framework versions"):text.index("## Citations")]
    assert re.fullmatch(r"### Framework versions\n\n- TRL: 1.16.0\n- Transformers: 5.24.0\n- PEFT \S+\n"
                        r"- peft-ext \S+\n\n", versions), versions
    assert "This model was trained with SFT.\n\n### Training hyperparameters\n\nThe following hyperparameters " \
           "were used during training:\n- learning_rate: 0.0002\n- seed: 42\n\n### Framework versions" in text
    # pushing the result again (a pulled copy, say) replaces our block instead of nesting a second one
    (folder / "README.md").write_text(str(card))
    again = render_card(folder, base_model=BASE, license="apache-2.0", extra_tags=["my-tag"],
                        training_args={"learning_rate": 2e-4, "seed": 42})
    assert str(again) == str(card)

    (folder / "README.md").write_text("---\nlicense: [unclosed\n---\n# x\n")
    with pytest.raises(ValueError, match=r"README.md: its YAML metadata block does not parse .*move README.md out"):
        render_card(folder, base_model=BASE, license="mit")


def test_license_comes_from_the_base_or_is_required(hub_server, tmp_path):
    _, folder, _ = _nullspace(tmp_path)
    hub_server.add_repo("tester/llama-like", {"README.md": b"---\nlicense: other\nlicense_name: llama3\n"
                                                          b"license_link: https://llama.example/LICENSE\n---\n"})
    push_adapter(folder, "tester/other-license", base_model="tester/llama-like")
    data = ModelCard.load("tester/other-license").data
    assert (data.license, data.license_name, data.license_link) == ("other", "llama3", "https://llama.example/LICENSE")

    hub_server.add_repo("tester/no-card", {"config.json": b"{}"})
    with pytest.raises(ValueError, match=r"license=None and no license is known .*pass license= \(--license\)"):
        push_adapter(folder, "tester/unlicensed", base_model="tester/no-card")
    with pytest.raises(ValueError, match=r"license=None and no license is known"):  # not looked up: not checked
        push_adapter(folder, "tester/unlicensed", base_model=BASE, check_base=False)
    assert "tester/unlicensed" not in hub_server.repo_ids()
    push_adapter(folder, "tester/elsewhere", base_model="other-org/not-here", check_base=False, license="mit")
    assert json.loads(hub_server.files("tester/elsewhere")["adapter_config.json"])["base_model_name_or_path"] == \
        "other-org/not-here"

    # a local base folder's own card names the license (the card command works offline)
    base_dir = tmp_path / "local-base"
    base_dir.mkdir()
    (base_dir / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# my base\n")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base_dir)}))
    assert render_card(folder, base_model=BASE).data.license == "cc-by-4.0"


def test_read_adapter_config_local_or_hub(hub_server, tmp_path):
    from peft_ext.hub import read_adapter_config

    _, folder, _ = _nullspace(tmp_path)
    push_adapter(folder, "tester/cfg", base_model=BASE)
    local = read_adapter_config(folder)
    assert local["peft_type"] == "NULLSPACE_LORA" and local["base_model_name_or_path"] is None
    assert read_adapter_config("tester/cfg") == {**local, "base_model_name_or_path": BASE}
    with pytest.raises(FileNotFoundError, match=rf"adapter='tester/none' is not a local directory, and "
                                                rf"{hub_server.url} has no repo 'tester/none'"):
        read_adapter_config("tester/none")
    with pytest.raises(FileNotFoundError, match=rf"Hub repo '{BASE}' has no adapter_config.json"):
        read_adapter_config(BASE)
    _raw_repo("tester/listy", {"adapter_config.json": b"[1]"})
    with pytest.raises(ValueError, match=r"Hub repo 'tester/listy': adapter_config.json has peft_type=\[1\], "
                                         r"expected a PEFT type name.*ask the owner"):
        read_adapter_config("tester/listy")
    with pytest.raises(FileNotFoundError, match=r"adapter='no/such/dir': no such directory"):
        read_adapter_config("no/such/dir")


def test_export_marker_stores_lists_and_reads_old_markers(tmp_path):
    from peft_ext.export import read_export_marker

    ns, _, _ = _nullspace(tmp_path)
    folder = Path(export_to_lora(ns, tmp_path / "export"))
    raw = json.loads((folder / "peft_ext_export.json").read_text())
    assert raw["source_config"]["target_modules"] == ["query", "value"]  # a sorted list, not "{'value', 'query'}"
    assert read_export_marker(folder) == raw
    raw["source_config"]["target_modules"] = "{'value', 'query'}"  # as peft-ext wrote it before
    (folder / "peft_ext_export.json").write_text(json.dumps(raw))
    assert read_export_marker(folder)["source_config"]["target_modules"] == ["query", "value"]
    raw["source_config"]["target_modules"] = "{'value', __import__('os')}"
    (folder / "peft_ext_export.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"source_config.target_modules=.* is neither a list nor a set of module "
                                         r"names; re-export"):
        read_export_marker(folder)
    assert read_export_marker(tmp_path) is None
