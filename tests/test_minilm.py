"""NullSpaceLoRA on the real pretrained MiniLM with real text: the null-space property holds out of sample."""

import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from peft_ext import NullSpaceLoraConfig, initialize_nullspace_lora

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
import data  # noqa: E402


@pytest.mark.slow
def test_minilm_calibration_on_documentation_text(minilm_path):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    model = get_peft_model(AutoModel.from_pretrained(minilm_path).eval(),
                           NullSpaceLoraConfig(r=16, target_modules=["query", "key", "value", "dense"],
                                               exclude_modules=["pooler.dense"]))

    def loader(texts):
        return [tok(texts[i : i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt")
                for i in range(0, len(texts), 16)]

    calib, heldout = data.general_text("calibration")[:128], data.general_text("heldout")[:48]
    report = initialize_nullspace_lora(model, loader(calib), heldout_dataloader=loader(heldout), progress=False)
    assert len(report.layers) == 36 and report.heldout == "held-out dataloader"
    # q/k/v read the same input, so they got the same basis from one decomposition
    q = model.base_model.model.encoder.layer[2].attention.self.query.nullspace_A["default"].weight
    v = model.base_model.model.encoder.layer[2].attention.self.value.nullspace_A["default"].weight
    assert torch.equal(q, v)
    for lr in report.layers:
        assert lr.heldout_ratio < 0.1, lr  # on documentation topics calibration never saw
        assert lr.init_output_ratio == 0.0  # v2: B = 0 exactly
        assert lr.eig_ratio < 1e-3 and lr.flags == []
