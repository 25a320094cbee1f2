"""Quiet and fast: the CLI's --help/--version without torch, progress bars that Hugging Face's switches silence,
bitsandbytes optional, one way to write target lists."""

import argparse
import ast
import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
from peft import get_peft_model

import peft_ext
from peft_ext import OrthoSplitConfig, SubspaceLoraConfig, collect_stats, entry_saliency
from peft_ext._progress import is_main_process, progress_bar
from peft_ext.cli import LORAX_FLAGS, build_parser
from peft_ext.lorax_options import TransferOptions
from trainer_ext import SpectralMonitorCallback, SpectralTrainingArguments
from trainer_ext.targets import find_targets, split_patterns

from .conftest import tiny_bert, token_batches

HEAVY = ("torch", "peft", "transformers", "bitsandbytes")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _subcommands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in child._actions):
                    yield from _subcommands(child, (*prefix, name))
                else:
                    yield (*prefix, name)


def _imports_of(argv):
    """Run the installed `peft-ext` script with `argv` under -X importtime: (exit status, stdout, imported modules)."""
    exe = os.path.join(os.path.dirname(sys.executable), "peft-ext")
    out = subprocess.run([sys.executable, "-X", "importtime", exe, *argv], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    modules = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    return out.returncode, out.stdout, modules


def test_help_and_version_do_not_import_torch_peft_or_transformers():
    commands = list(_subcommands(build_parser()))
    assert {"inspect", "export-lora", "push", "card"} | {("lorax", "convert")} <= {c if len(c) > 1 else c[0]
                                                                                  for c in commands}
    for argv in [["--help"], ["--version"], *[[*c, "--help"] for c in commands]]:
        status, stdout, modules = _imports_of(argv)
        assert status == 0, (argv, stdout)
        assert "peft_ext.cli" in modules, (argv, "the script ran something else")  # the run is really measured
        heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
        assert heavy == [], (argv, heavy[:5])
        if argv == ["--version"]:
            assert stdout == f"peft-ext {importlib.metadata.version('peft-ext')}\n"
        else:
            assert stdout.startswith("usage: peft-ext")
    # a usage error is answered as quickly: no command runs
    status, _, modules = _imports_of(["lorax", "convert", "--rank", "two"])
    assert status == 2 and not [m for m in modules if m.split(".")[0] in HEAVY]


def test_lorax_options_are_the_dataclass_fields():
    fields = {f.name: f for f in dataclasses.fields(TransferOptions)}
    assert set(LORAX_FLAGS) == {n for n, f in fields.items() if f.metadata.get("cli", True)} == set(fields) - {
        "adapter_name"}
    parser = build_parser()
    base = ["lorax", "convert", "--adapter", "a", "--source-base", "s", "--target-base", "t", "--out", "o"]
    defaults = parser.parse_args(base)
    assert {n: getattr(defaults, n) for n in LORAX_FLAGS} == {n: fields[n].default for n in LORAX_FLAGS}
    args = parser.parse_args([*base, "--no-carry-complement", "--energy", "0.5", "--on_low_similarity", "drop",
                              "--method", "delta-sigma", "--subspace-rank", "7", "--no-cache", "--no-progress",
                              "--force"])
    opts = TransferOptions(**{n: getattr(args, n) for n in LORAX_FLAGS})
    assert (opts.carry_complement, opts.energy, opts.on_low_similarity, opts.method, opts.subspace_rank, opts.cache,
            opts.progress, opts.force, opts.rank) == (False, 0.5, "drop", "delta-sigma", 7, False, False, True, None)
    with pytest.raises(SystemExit):  # Literal fields are choices
        parser.parse_args([*base, "--method", "svd"])


def test_quiet_is_deprecated_for_progress():
    with pytest.warns(FutureWarning, match="use progress=False"):
        opts = TransferOptions(quiet=True)
    assert opts.progress is False and "quiet" not in dataclasses.asdict(opts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TransferOptions(progress=False).progress is False and TransferOptions().progress is True


@pytest.fixture
def bars_on(monkeypatch):
    """Progress bars as a fresh process has them (HF_HUB_DISABLE_PROGRESS_BARS unset, none disabled), rank 0."""
    hf_tqdm = sys.modules["huggingface_hub.utils.tqdm"]  # the module (huggingface_hub.utils.tqdm is its class)

    monkeypatch.setattr(hf_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    monkeypatch.delenv("RANK", raising=False)
    enable_progress_bars()
    yield
    enable_progress_bars()


def _subspace(k=2):
    return get_peft_model(tiny_bert(), SubspaceLoraConfig(k=k, target_modules=["query", "value"]))


@functools.cache
def _masked_lm():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=24, max_position_embeddings=32))


def _saliency(**kw):  # entry_saliency leaves the model as it was: one model serves every call
    batches = [dict(b, labels=b["input_ids"]) for b in token_batches(n_batches=3, seq=6)]
    return entry_saliency(_masked_lm(), batches, OrthoSplitConfig(target_modules=["query"], base_kind="none"), **kw)


SITES = {  # what draws a bar, and the text its last refresh shows
    "subspace": (lambda **kw: _subspace(), "SubspaceLoRA: top-k SVD: 100%|", "| 4/4 "),
    "saliency": (_saliency, "entry saliency (fisher): 100%|", "| 3/3 "),
    "stats": (lambda **kw: collect_stats(tiny_bert(), token_batches(n_batches=2), ["query"], **kw),
              "activation statistics: 100%|", "| 2/2 "),
}


@pytest.mark.parametrize("site", sorted(SITES))
def test_progress_bars_and_every_switch_that_silences_them(site, bars_on, capsys, monkeypatch):
    hf_tqdm = sys.modules["huggingface_hub.utils.tqdm"]  # the module (huggingface_hub.utils.tqdm is its class)
    from transformers.utils import logging as hf_logging

    run, desc, count = SITES[site]
    run()
    err = capsys.readouterr().err
    assert desc in err and count in err, err[-300:]

    def silent(switch_on, switch_off=lambda: None, **kw):
        switch_on()
        try:
            run(**kw)
        finally:
            switch_off()
        assert desc.split(":")[0] not in capsys.readouterr().err

    silent(disable_progress_bars, enable_progress_bars)
    silent(lambda: disable_progress_bars("peft_ext"), lambda: enable_progress_bars("peft_ext"))
    silent(hf_logging.disable_progress_bar, hf_logging.enable_progress_bar)
    silent(lambda: monkeypatch.setattr(hf_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", True),
           lambda: monkeypatch.setattr(hf_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", None))
    silent(lambda: monkeypatch.setenv("RANK", "1"), lambda: monkeypatch.delenv("RANK"))  # not the main process
    if site != "subspace":  # get_peft_model takes no per-call switch
        silent(lambda: None, progress=False)
    run()  # every switch was undone
    assert desc in capsys.readouterr().err


def test_main_process_and_the_bar_closes_when_a_loop_leaves_early(bars_on, capsys, monkeypatch):
    assert is_main_process()
    for rank, main in (("0", True), ("3", False)):
        monkeypatch.setenv("RANK", rank)
        assert is_main_process() is main
    monkeypatch.delenv("RANK")
    with progress_bar(range(10), desc="early", total=10) as bar:
        for i in bar:
            if i == 2:
                break
    assert bar.disable or bar.n == 2  # closed by the with block: its last state is on stderr
    assert "early:  20%|" in capsys.readouterr().err


def test_our_modules_import_bitsandbytes_only_inside_functions():
    top_level = []
    for path in sorted((ROOT / "peft_ext").rglob("*.py")) + sorted((ROOT / "trainer_ext").rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            top_level += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "bitsandbytes"]
    assert top_level == []


def test_a_quantized_path_without_bitsandbytes_names_the_extra(monkeypatch):
    from peft_ext.ortho.layer import bnb_base

    from peft.import_utils import is_bnb_4bit_available, is_bnb_available

    # peft caches whether bitsandbytes is installed: fill its cache with the truth first, so that what this test
    # pretends cannot leak into later tests
    is_bnb_available(), is_bnb_4bit_available()
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` meets when it is not installed
        with pytest.raises(ImportError, match=r"^OrthoSplitConfig.base_kind='bnb_nf4' needs bitsandbytes, which is not "
                                              r"installed: pip install 'peft-ext\[quant\]'; base_kind='nf4'"):
            bnb_base(torch.zeros(4, 64), "bnb_nf4", torch.float32)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else real_find_spec(name, *a))
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ImportError, match=r"base_kind='bnb_int8' needs bitsandbytes, which is not installed: pip "
                                          r"install 'peft-ext\[quant\]'"):
        peft_ext.orthosplit(model, OrthoSplitConfig(target_modules=["query"], base_kind="bnb_int8"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any change


def test_targets_accept_the_same_forms_in_python_and_on_the_command_line():
    assert split_patterns("q_proj,v_proj") == split_patterns(["q_proj", "v_proj"]) == split_patterns(
        ("q_proj", " v_proj ")) == split_patterns(["q_proj,v_proj"]) == ["q_proj", "v_proj"]
    assert split_patterns(None) == [] and split_patterns("") == []
    assert split_patterns(r"query,re:layer\.\d{1,2}\.attention,re:[,;]x") == ["query", r"re:layer\.\d{1,2}\.attention",
                                                                              "re:[,;]x"]
    with pytest.raises(TypeError, match=r"spec_targets=5 is not a pattern list; pass a comma-separated string"):
        split_patterns(5, "spec_targets")
    with pytest.raises(TypeError, match="targets="):
        SpectralMonitorCallback(targets=[b"query"])
    model = tiny_bert()
    args = SpectralTrainingArguments(output_dir="unused", spec_targets="query,value", report_to="none")
    for cb in (SpectralMonitorCallback(targets="query,value"), SpectralMonitorCallback(targets=("query", "value")),
               SpectralMonitorCallback(targets=args.spec_target_list)):
        names = [t.name for t in find_targets(model, cb.patterns)]
        assert len(names) == 4 and {n.rsplit(".", 1)[1] for n in names} == {"query", "value"}  # 2 layers x 2
    assert SpectralMonitorCallback(track="weight,grad").track == ("weight", "grad")
