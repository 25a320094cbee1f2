"""Three tiny base models for the tuner contract matrix (tests/test_tuner_contract.py): an MLP of nn.Linear layers,
a GPT-2 (transformers' Conv1D layers, weights stored (in, out)) and a Llama (grouped-query attention, gated MLP).

Each `TinyModel` says how to build the model (seeded, float32, eval mode: two builds are identical), how to make a
batch for it, which layers the matrix adapts (all of them, and two adapters' worth on disjoint and on overlapping
layers) and one module no peft-ext tuner can adapt, for the refusal checks. Dimensions are a few dozen at most, so a
whole check runs in milliseconds.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

VOCAB = 64


@dataclass(frozen=True)
class TinyModel:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int], dict]  # seed -> keyword arguments of the model's forward
    targets: tuple[str, ...]  # what one adapter adapts in most checks
    disjoint: tuple[tuple[str, ...], tuple[str, ...]]  # two adapters that share no layer
    overlapping: tuple[tuple[str, ...], tuple[str, ...]]  # two adapters that share at least one layer
    unsupported: str  # a module name (an embedding or a norm) that every tuner must refuse

    def __repr__(self) -> str:
        return self.name


class MLP(nn.Module):
    """LayerNorm -> three nn.Linear layers with tanh between them."""

    def __init__(self, d_in: int = 8, d_hidden: int = 12, d_out: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.lin0 = nn.Linear(d_in, d_hidden)
        self.lin1 = nn.Linear(d_hidden, d_hidden)
        self.out = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin1(torch.tanh(self.lin0(self.norm(x))))))


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A builder of identical fresh copies: the model is built once (seeded), each call deep-copies it (5x faster than
    building a transformers model again)."""

    @functools.cache
    def prototype() -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build()
            # non-trivial norm parameters too, so nothing in the model is at a special value
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" in name or name.split(".")[-2].startswith("ln"):
                        p.add_(torch.randn(p.shape) * 0.1)
        return model.eval()

    return lambda: copy.deepcopy(prototype())


def _mlp() -> nn.Module:
    return MLP()


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    return LlamaForCausalLM(cfg)


def _float_batch(seed: int) -> dict:
    return {"x": torch.randn(6, 8, generator=torch.Generator().manual_seed(seed))}


def _token_batch(seed: int) -> dict:
    return {"input_ids": torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))}


MLP_MODEL = TinyModel(
    name="mlp",
    build=_seeded(_mlp),
    batch=_float_batch,
    targets=("lin0", "lin1", "out"),
    disjoint=(("lin0",), ("lin1", "out")),
    overlapping=(("lin0", "lin1"), ("lin1", "out")),
    unsupported="norm",
)
GPT2_MODEL = TinyModel(
    name="gpt2",
    build=_seeded(_gpt2),
    batch=_token_batch,
    targets=("c_attn", "c_proj", "c_fc"),  # c_proj: the attention's and the MLP's output projections
    disjoint=(("c_attn",), ("c_fc",)),
    overlapping=(("c_attn", "c_proj"), ("c_proj", "c_fc")),
    unsupported="wte",
)
LLAMA_MODEL = TinyModel(
    name="llama",
    build=_seeded(_llama),
    batch=_token_batch,
    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    disjoint=(("q_proj", "v_proj"), ("up_proj", "down_proj")),
    overlapping=(("q_proj", "v_proj"), ("v_proj", "down_proj")),
    unsupported="input_layernorm",
)
TINY_MODELS = (MLP_MODEL, GPT2_MODEL, LLAMA_MODEL)


def output(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's output tensor (logits for the language models)."""
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out
