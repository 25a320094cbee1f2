import json
import os
import subprocess
import sys

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


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "peft-ext")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "export-lora" in out.stdout
