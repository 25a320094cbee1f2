import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_ext import NullSpaceLoraConfig, initialize_nullspace_lora
from peft_ext.cli import main

from .conftest import tiny_bert, token_batches


def _adapter(tmp_path):
    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(tiny_bert(), NullSpaceLoraConfig(r=4, target_modules=["query", "value"], mode="split"))
    initialize_nullspace_lora(model, token_batches(), progress=False, warn=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "adapter")
    return model.eval()


def test_inspect_tells_how_to_load(tmp_path, capsys):
    _adapter(tmp_path)
    assert main(["inspect", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "peft_type:  NULLSPACE_LORA" in out and "import peft_ext" in out and "mode:" in out


def test_export_lora_command(tmp_path, capsys):
    model = _adapter(tmp_path)
    assert main(["export-lora", str(tmp_path / "adapter"), str(tmp_path / "lora"), "--base", str(tmp_path / "base")]) == 0
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8  # split mode: rank 2r
    batch = token_batches(n_batches=1, seed=4)[0]
    from transformers import BertModel

    plain = PeftModel.from_pretrained(BertModel.from_pretrained(tmp_path / "base"), tmp_path / "lora").eval()
    with torch.no_grad():
        assert torch.allclose(plain(**batch).last_hidden_state, model(**batch).last_hidden_state, atol=1e-5)
    main(["inspect", str(tmp_path / "lora")])
    assert "a type vanilla PEFT knows" in capsys.readouterr().out


def test_console_script_is_installed(tmp_path):
    """The installed `peft-ext` script: a failure is one line on stderr and exit status 1 (not a traceback)."""
    exe = os.path.join(os.path.dirname(sys.executable), "peft-ext")
    out = subprocess.run([exe, "inspect", str(tmp_path / "missing")], capture_output=True, text=True)
    # bitsandbytes prints a notice of its own when peft_ext imports it (issue 18 makes it an optional extra)
    lines = [line for line in out.stderr.splitlines() if "gemm_4bit_forward" not in line]
    assert out.returncode == 1 and out.stdout == "", out.stderr
    assert lines == [f"peft-ext: error: adapter={str(tmp_path / 'missing')!r}: no such directory (and not a Hub repo "
                     "id); check the path"], out.stderr


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Inputs the bad-input tests copy before damaging: a base, a base of other shapes, a NullSpaceLoRA adapter that
    names no base (tiny_bert has no name_or_path) and a plain LoRA adapter that records the base's path."""
    from peft import LoraConfig
    from transformers import BertModel

    root = tmp_path_factory.mktemp("saved")
    tiny_bert().save_pretrained(root / "base")
    tiny_bert(hidden_size=48, intermediate_size=64).save_pretrained(root / "other_base")
    ns = get_peft_model(tiny_bert(), NullSpaceLoraConfig(r=2, target_modules=["query", "value"]))
    initialize_nullspace_lora(ns, token_batches(n_batches=1), progress=False, warn=False)
    ns.save_pretrained(root / "ns")
    lora = get_peft_model(BertModel.from_pretrained(root / "base"), LoraConfig(r=2, target_modules=["query"]))
    lora.save_pretrained(root / "lora")
    assert not json.loads((root / "ns" / "adapter_config.json").read_text()).get("base_model_name_or_path")
    return root


@pytest.fixture
def no_progress_bars(monkeypatch):
    """transformers' "Loading weights" bar also goes to stderr; these tests count stderr's lines."""
    import transformers.utils.logging as tlog

    monkeypatch.setattr(tlog, "_tqdm_active", False)


def _copy(saved, name, tmp_path):
    return shutil.copytree(saved / name, tmp_path / name)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _error(capsys, argv, status=1):
    """Run the CLI in-process: it must return `status` and print exactly one line on stderr, the error, naming what
    failed; no traceback."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == status, err
    assert err.startswith("peft-ext: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    return err.strip()


def test_inspect_bad_input_is_one_line(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert re.search(r"adapter='.*missing': no such directory \(and not a Hub repo id\); check the path",
                     _error(capsys, ["inspect", missing]))
    (tmp_path / "file.json").write_text("{}")
    assert "file.json' is a file; pass the directory" in _error(capsys, ["inspect", tmp_path / "file.json"])
    (tmp_path / "empty").mkdir()
    assert re.search(r"empty' has no adapter_config.json.*save_pretrained",
                     _error(capsys, ["inspect", tmp_path / "empty"]))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "adapter_config.json").write_text('{"peft_type": "LORA",')
    assert re.search(r"corrupt/adapter_config.json is not valid JSON \(.*\); re-save",
                     _error(capsys, ["inspect", tmp_path / "corrupt"]))
    (tmp_path / "corrupt" / "adapter_config.json").write_text("[1, 2]")
    assert "adapter_config.json has peft_type=[1, 2], expected a PEFT type name" in _error(
        capsys, ["inspect", tmp_path / "corrupt"])
    # offline, a repo id that is in no cache
    assert re.search(r"adapter='nobody/nothing' is not a local directory, and it is not in the Hub cache "
                     r"\(HF_HUB_OFFLINE is set\)", _error(capsys, ["inspect", "nobody/nothing"]))


def test_export_lora_bad_input_is_one_line(saved, tmp_path, capsys, no_progress_bars):
    out = tmp_path / "out"
    ns, base = saved / "ns", saved / "base"
    # the adapter names no base and --base is missing: a usage error that says which option to add
    line = _error(capsys, ["export-lora", ns, out], status=2)
    assert f"{ns / 'adapter_config.json'} names no base model (base_model_name_or_path is empty)" in line
    assert line.endswith("pass the model the adapter was trained on with --base DIR_OR_REPO_ID")
    assert f"--base={str(tmp_path / 'nope')!r}: no such directory" in _error(
        capsys, ["export-lora", ns, out, "--base", tmp_path / "nope"])
    assert f"base model directory {str(ns)!r} has no config.json" in _error(
        capsys, ["export-lora", ns, out, "--base", ns])
    broken = _copy(saved, "ns", tmp_path)
    _truncate(broken / "adapter_model.safetensors")
    assert re.search(r"ns/adapter_model.safetensors is not a complete safetensors file \(.*\); it was truncated",
                     _error(capsys, ["export-lora", broken, out, "--base", base]))
    broken_base = _copy(saved, "base", tmp_path)
    _truncate(broken_base / "model.safetensors")
    assert f"{broken_base / 'model.safetensors'} is not a complete safetensors file" in _error(
        capsys, ["export-lora", ns, out, "--base", broken_base])
    (broken_base / "config.json").write_text("{")
    assert f"{broken_base / 'config.json'} is not valid JSON" in _error(
        capsys, ["export-lora", ns, out, "--base", broken_base])
    # a base of other shapes: whoever notices (torch's multi-line size-mismatch list, PEFT, our layers) names neither
    # the base nor --base; the line does
    line = _error(capsys, ["export-lora", ns, out, "--base", saved / "other_base"])
    assert re.search(rf"the adapter {re.escape(repr(str(ns)))} does not load onto the base model --base='.*other_base'"
                     r": .*shape.*; if that is not the model it was trained on, pass the model the adapter was trained "
                     r"on with --base DIR_OR_REPO_ID$", line), line
    assert "peft_type='LORA', which export-lora does not convert; it already is a plain LoRA adapter" in _error(
        capsys, ["export-lora", saved / "lora", out, "--base", base])
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert f"out={str(out)!r} exists; pass --overwrite to replace it" in _error(
        capsys, ["export-lora", ns, out, "--base", base])
    assert (out / "keep.txt").read_text() == "mine"
    assert f"'{out / 'keep.txt'}' is a file; choose another path" in _error(
        capsys, ["export-lora", ns, out / "keep.txt" / "sub", "--base", base])


def test_export_lora_base_recorded_but_missing_says_base(saved, tmp_path, capsys):
    moved = _copy(saved, "ns", tmp_path)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(tmp_path / "gone")}))
    line = _error(capsys, ["export-lora", moved, tmp_path / "out"])
    assert re.search(r"base_model_name_or_path='.*gone': no such directory \(and not a Hub repo id\); it is recorded "
                     r"in .*ns/adapter_config.json: pass the model the adapter was trained on with --base", line), line


def _convert(adapter, source, target, out, *extra):
    return ["lorax", "convert", "--adapter", adapter, "--source-base", source, "--target-base", target, "--out", out,
            "--subspace-rank", "4", "--no-cache", "--quiet", *extra]


def test_lorax_convert_bad_input_is_one_line(saved, tmp_path, capsys):
    lora, base, out = saved / "lora", saved / "base", tmp_path / "out"
    assert f"--adapter={str(tmp_path / 'nope')!r}: no such directory" in _error(
        capsys, _convert(tmp_path / "nope", base, base, out))
    assert f"--target-base={str(tmp_path / 'nope')!r}: no such directory" in _error(
        capsys, _convert(lora, base, tmp_path / "nope", out))
    broken = _copy(saved, "lora", tmp_path)
    _truncate(broken / "adapter_model.safetensors")
    assert f"{broken / 'adapter_model.safetensors'} is not a complete safetensors file" in _error(
        capsys, _convert(broken, base, base, out))
    (broken / "adapter_config.json").write_text("{")
    assert f"{broken / 'adapter_config.json'} is not valid JSON" in _error(capsys, _convert(broken, base, base, out))
    broken_base = _copy(saved, "base", tmp_path)
    _truncate(broken_base / "model.safetensors")
    assert f"{broken_base / 'model.safetensors'} is not a complete safetensors file" in _error(
        capsys, _convert(lora, broken_base, base, out, "--force"))
    # a source base that is not the one the adapter records
    assert re.search(r"base_model_name_or_path='.*base' differs from source_base='.*other_base'.*--force",
                     _error(capsys, _convert(lora, saved / "other_base", base, out)))
    # option values: usage errors (status 2) that name the flag as typed
    assert _error(capsys, _convert(lora, base, base, out, "--rank", "0"), status=2) == (
        "peft-ext: error: --rank=0 must be an integer >= 1")
    assert "--min-similarity=1.5 must be in [0, 1]" in _error(
        capsys, _convert(lora, base, base, out, "--min-similarity", "1.5"), status=2)
    assert "--push-to-hub='not a repo' is not a Hub repo id" in _error(
        capsys, _convert(lora, base, base, out, "--push-to-hub", "not a repo"), status=2)
    out.mkdir()
    assert f"--out={str(out)!r} exists; pass --overwrite" in _error(capsys, _convert(lora, base, base, out))
    (tmp_path / "file").write_text("")
    assert "file' is a file; choose another path" in _error(capsys, _convert(lora, base, base, tmp_path / "file" / "o"))
    assert sorted(os.listdir(out)) == []


def test_push_and_card_bad_input_is_one_line(saved, tmp_path, capsys):
    ns = saved / "ns"
    assert f"adapter_dir={str(tmp_path / 'nope')!r} is not a directory" in _error(
        capsys, ["push", tmp_path / "nope", "me/x"])
    # the library reads only the header, so without the CLI's check a truncated file would go to the Hub (offline
    # here, so reaching the upload would be a different error)
    broken = _copy(saved, "ns", tmp_path)
    _truncate(broken / "adapter_model.safetensors")
    assert f"{broken / 'adapter_model.safetensors'} is not a complete safetensors file" in _error(
        capsys, ["push", broken, "me/x", "--base-model", "org/base"])
    assert "REPO_ID='not a repo' is not a Hub repo id" in _error(capsys, ["push", ns, "not a repo"], status=2)
    assert f"--revision={'a' * 40!r} is a commit sha" in _error(
        capsys, ["push", ns, "me/x", "--revision", "a" * 40], status=2)
    (broken / "adapter_config.json").write_text("{")
    assert f"{broken / 'adapter_config.json'} is not valid JSON" in _error(capsys, ["card", broken])
    readme = tmp_path / "README.md"
    readme.write_text("my own card")
    assert f"--out={str(readme)!r} exists; pass --overwrite to replace it" in _error(
        capsys, ["card", ns, "--out", readme, "--base-model", "org/base"])
    assert readme.read_text() == "my own card"
    assert main(["card", str(ns), "--out", str(readme), "--base-model", "org/base", "--overwrite", "--license",
                 "mit"]) == 0
    assert "org/base" in readme.read_text()
    assert f"'{readme}' is a file; choose another path" in _error(
        capsys, ["card", ns, "--out", readme / "README.md", "--base-model", "org/base"])


@pytest.mark.filterwarnings("ignore:the adapter's base model .* is a local path")  # the converted adapter's card
def test_hub_failures_are_one_line(saved, tmp_path, capsys, hub_server, monkeypatch):
    ns = str(saved / "ns")
    assert re.search(r"adapter='tester/nothing' is not a local directory, and http://127\.0\.0\.1:\d+ has no repo "
                     r"'tester/nothing' that you can see; .*hf auth login",
                     _error(capsys, ["inspect", "tester/nothing"]))
    from huggingface_hub import HfApi

    HfApi().create_repo("tester/not-an-adapter")
    assert "Hub repo 'tester/not-an-adapter' has no adapter_config.json" in _error(
        capsys, ["inspect", "tester/not-an-adapter"])
    line = _error(capsys, ["push", ns, "someone-else/x", "--base-model", "org/base", "--no-check-base", "--license",
                           "mit"])
    assert re.search(r"the Hub refused http://.*/api/repos/create \(HTTP 403: .*someone-else.*\); your token lacks "
                     "access", line), line
    monkeypatch.delenv("HF_TOKEN")
    hub_server.require_token = True
    line = _error(capsys, ["push", ns, "tester/x", "--base-model", "org/base", "--no-check-base", "--license", "mit"])
    assert re.search(r"the Hub refused http://.*/api/repos/create \(HTTP 401: .*\); no valid token was sent: run "
                     r"`hf auth login` or set HF_TOKEN", line), line
    # a conversion whose push fails says that the converted adapter is on disk and how to push it later
    out = tmp_path / "converted"
    line = _error(capsys, _convert(saved / "lora", saved / "base", saved / "base", out, "--push-to-hub", "tester/y"))
    # (the target base is a local folder: the push refuses it before any request, naming --base-model)
    assert f"the adapter was written to {out}, but pushing it failed: " in line and "a local path" in line
    assert "(--base-model)" in line and line.endswith(f"push it later with `peft-ext push {out} tester/y`")
    assert (out / "adapter_model.safetensors").is_file()
    assert hub_server.repo_ids() == ["tester/not-an-adapter"]


def test_unreachable_hub_is_one_line(saved, capsys, hub_server, monkeypatch):
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    import peft_ext.hub

    # the library retries a refused connection with waits between tries: the same tries, without the waits
    monkeypatch.setattr(peft_ext.hub, "RETRY_WAITS", (0,) * len(getattr(peft_ext.hub, "RETRY_WAITS", ())),
                        raising=False)
    line = _error(capsys, ["push", saved / "ns", "tester/x", "--base-model", "org/base"])
    # said by the CLI's translation of the client's error, or by the library if it wraps it first
    assert dead in line and "ConnectError" in line and "HF_ENDPOINT" in line, line


def test_usage_errors_are_one_line_with_status_2(capsys):
    assert _error(capsys, ["lorax", "convert", "--adapter", "x"], status=2) == (
        "peft-ext: error: the following arguments are required: --source-base, --target-base, --out; see "
        "`peft-ext lorax convert --help`")
    assert "argument --rank: invalid int value: 'two'" in _error(
        capsys, ["lorax", "convert", "--adapter", "a", "--source-base", "s", "--target-base", "t", "--out", "o",
                 "--rank", "two"], status=2)
    assert "unrecognized arguments: --bogus; see `peft-ext --help`" in _error(capsys, ["inspect", "x", "--bogus"],
                                                                               status=2)
    assert "see `peft-ext --help`" in _error(capsys, [], status=2)
    assert main(["--help"]) == 0 and "export-lora" in capsys.readouterr().out


def test_debug_shows_the_traceback(tmp_path, capsys):
    for argv in (["--debug", "inspect", tmp_path / "missing"], ["inspect", tmp_path / "missing", "--debug"]):
        assert main([str(a) for a in argv]) == 1
        err = capsys.readouterr().err.splitlines()
        assert err[0] == "Traceback (most recent call last):" and "FileNotFoundError" in err[-2]
        assert err[-1].startswith("peft-ext: error: adapter=") and err[-1].endswith("check the path")


def test_a_bug_is_reported_as_internal_error(saved, capsys, monkeypatch):
    import peft_ext.registry

    def broken(peft_type):
        return {}[peft_type]  # a KeyError: what a bug in peft-ext looks like, not a bad input

    monkeypatch.setattr(peft_ext.registry, "missing_type_hint", broken)
    assert main(["inspect", str(saved / "ns")]) == 1
    err = capsys.readouterr().err
    assert err == ("peft-ext: internal error: KeyError: 'NULLSPACE_LORA'; this is a bug in peft-ext, not in your "
                   "input: rerun with --debug and report the command and the traceback\n")


def test_every_option_has_help():
    from peft_ext.cli import build_parser

    def walk(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from walk(child)
            else:
                yield parser.prog, action

    missing = [f"{prog} {'/'.join(a.option_strings) or a.dest}" for prog, a in walk(build_parser()) if not a.help]
    assert missing == []
