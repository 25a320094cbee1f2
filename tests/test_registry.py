import importlib
import json
import subprocess
import sys

import pytest
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType

import peft_ext
from peft_ext import NullSpaceLoraConfig, NullSpaceLoraModel
from peft_ext.registry import register


def test_import_registers_our_type_with_a_unique_prefix():
    assert PeftType.NULLSPACE_LORA.value == "NULLSPACE_LORA"
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.NULLSPACE_LORA] is NullSpaceLoraModel
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.NULLSPACE_LORA] is NullSpaceLoraConfig
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.NULLSPACE_LORA]
    assert prefix == "nullspace_" == NullSpaceLoraModel.prefix
    others = [p for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if t != PeftType.NULLSPACE_LORA]
    assert not [p for p in others if p in prefix or prefix in p]


def test_registration_is_idempotent_even_across_reload():
    register("nullspace_lora", NullSpaceLoraConfig, NullSpaceLoraModel, prefix="nullspace_")
    importlib.reload(peft_ext)  # re-runs the module-level registration
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.NULLSPACE_LORA] is peft_ext.NullSpaceLoraModel


def test_conflicting_registrations_are_refused():
    class Other(NullSpaceLoraModel):
        prefix = "other_"

    with pytest.raises(KeyError, match="already registered"):
        register("nullspace_lora", NullSpaceLoraConfig, Other, prefix="other_")
    with pytest.raises(KeyError, match="overlaps the prefix"):
        register("peftext_probe", NullSpaceLoraConfig, Other, prefix="lora_")  # LoRA's prefix
    assert "PEFTEXT_PROBE" not in PeftType.__members__  # a refused registration leaves PEFT untouched


def test_loading_without_import_fails_in_peft_and_inspect_explains(tmp_path):
    (tmp_path / "adapter").mkdir()
    cfg = NullSpaceLoraConfig(r=2, target_modules=["q"])
    cfg.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "NULLSPACE_LORA"
    code = ("from peft import PeftConfig\n"
            f"PeftConfig.from_pretrained({str(tmp_path / 'adapter')!r})\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    # PEFT's own code raises before any of ours could run: this is the documented limitation ...
    assert out.returncode != 0 and "KeyError: 'NULLSPACE_LORA'" in out.stderr
    # ... and the command that explains it
    cli = subprocess.run([sys.executable, "-m", "peft_ext.cli", "inspect", str(tmp_path / "adapter")],
                         capture_output=True, text=True)
    assert cli.returncode == 0 and "import peft_ext" in cli.stdout
    # with the import, the same call works
    code_ok = "import peft_ext\n" + code
    assert subprocess.run([sys.executable, "-c", code_ok], capture_output=True, text=True).returncode == 0
