"""Hub round trips through the real huggingface_hub client against the local server of tests/hub_server.py.

Every adapter kind peft-ext produces is pushed, loaded back by repo id with PeftModel.from_pretrained and compared
with the in-memory model; the card's metadata and report tables are read back from the server.
"""

from __future__ import annotations

import json
import os
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
    assert hub_server.repo_ids() == []


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
BATCH = token_batches(n_batches=1, seed=7)[0]


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
    assert str(card) == str(render_card(folder, repo_id=repo_id, calibration="4 batches of random tokens", **kwargs))


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
    assert hub_server.requests == [] and hub_server.repo_ids() == []


def test_cli_card_and_push(hub_server, tmp_path, capsys):
    _, folder, report = _nullspace(tmp_path)
    report.save_json(str(tmp_path / "report.json"))
    common = ["--base-model", BASE, "--calibration", "random tokens", "--report", str(tmp_path / "report.json")]
    assert main(["card", str(folder), "--out", str(tmp_path / "README.md"), *common]) == 0
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == BASE and "nullspace-lora" in card.data.tags and "λmin/λmax" in card.text
    assert main(["push", str(folder), "tester/cli", "--revision", "exp", "--message", "from the CLI", *common]) == 0
    assert "tester/cli (exp)" in capsys.readouterr().out
    assert hub_server.history("tester/cli", "exp")[0].title == "from the CLI"
    assert "adapter_config.json" not in hub_server.files("tester/cli", "main")  # the branch got it, not main
    with pytest.raises(SystemExit, match="peft-ext push: error: .*has no adapter_config.json"):
        main(["push", str(tmp_path), "tester/cli"])


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
