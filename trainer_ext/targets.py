"""Which matrices to watch: name patterns with aliases, so timm-style and transformers-style names both match.

`"mlp.fc1"` finds `blocks.3.mlp.fc1` in a timm ViT, `encoder.layer.3.intermediate.dense` in BERT/transformers' ViT,
`model.layers.3.mlp.up_proj`/`gate_proj` in Llama and `transformer.h.3.mlp.c_fc` in GPT-2.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

# alias -> regexes matched against the end of a module's canonical name (segment boundary before)
ALIASES: dict[str, tuple[str, ...]] = {
    "attn.qkv": (r"attn\.qkv", r"attention(\.self|\.attention)?\.(query|key|value)", r"(self_attn|attention)\.[qkv]_proj",
                 r"attn\.c_attn"),
    "attn.proj": (r"attn\.proj", r"attention\.output\.dense", r"(self_attn|attention)\.o_proj", r"attn\.c_proj"),
    "mlp.fc1": (r"mlp\.fc1", r"intermediate\.dense", r"mlp\.(up|gate)_proj", r"mlp\.c_fc"),
    "mlp.fc2": (r"mlp\.fc2", r"\d+\.output\.dense", r"mlp\.down_proj", r"mlp\.c_proj"),
}


def split_patterns(value: str | Iterable[str] | None, field: str = "targets") -> list[str]:
    r"""Patterns from the forms users write, the same in Python and on the command line: a comma-separated string
    (`"q_proj,v_proj"`), a list/tuple of names (each may itself hold commas), or None (no patterns). A comma inside
    `{...}` or `[...]` belongs to a `re:` pattern (`re:layers\.\d{1,2}\.mlp`) and does not split it."""
    if value is None:
        return []
    if isinstance(value, str):
        parts, depth, start = [], 0, 0
        for i, ch in enumerate(value):
            depth += (ch in "{[") - (ch in "}]")
            if ch == "," and depth <= 0:
                parts.append(value[start:i])
                start = i + 1
        parts.append(value[start:])
        return [p.strip() for p in parts if p.strip()]
    if isinstance(value, Iterable) and not isinstance(value, (bytes, dict)):
        items = list(value)
        if all(isinstance(item, str) for item in items):
            return [p for item in items for p in split_patterns(item, field)]
    raise TypeError(f"{field}={value!r} is not a pattern list; pass a comma-separated string such as 'q_proj,v_proj' "
                    "or a list of strings such as ['q_proj', 'v_proj']")


def pattern_regex(pattern: str) -> re.Pattern:
    """A user pattern as one regex: an alias, `re:<regex>`, or a literal name suffix."""
    if pattern in ALIASES:
        body = "|".join(f"(?:{p})" for p in ALIASES[pattern])
    elif pattern.startswith("re:"):
        body = pattern[3:]
    else:
        body = re.escape(pattern)
    return re.compile(rf"(?:^|\.)(?:{body})$")


@dataclass
class Target:
    """One watched matrix: a dense weight, or a low-rank adapter branch measured as its effective delta W."""

    name: str  # canonical module name, used in metric keys
    module: nn.Module
    param: torch.Tensor | None  # the dense weight (None for adapter branches)
    transposed: bool = False  # Conv1D stores (in, out)

    def matrix(self):
        """The (out, in) matrix, or (scaled B, A) for a low-rank branch so its SVD needs only the small factors."""
        if self.param is None:
            return branch_factors(self.module)
        w = self.param.detach()
        return w.T if self.transposed else w

    @property
    def shape(self) -> tuple[int, int]:
        m = self.matrix()
        if isinstance(m, tuple):
            return (m[0].shape[0], m[1].shape[1])
        return tuple(m.shape)


def branch_factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None:
    """The active adapter's update of a PEFT layer: (s*B, A) when it is exactly low rank (PEFT LoRA, peft-ext
    layers), else the dense delta W (out, in) from `get_delta_weight` (e.g. SubspaceLoRA with a trained residual),
    else None."""
    active = getattr(module, "active_adapters", None)
    if not active:
        return None
    name = active[0]
    try:
        if callable(getattr(module, "lora_factors", None)):
            a, b = module.lora_factors(name)
            return (b.detach() * module.scaling[name], a.detach())
        if hasattr(module, "lora_A") and name in getattr(module, "lora_A", {}):
            return (module.lora_B[name].weight.detach() * module.scaling[name], module.lora_A[name].weight.detach())
    except ValueError:  # no exact low-rank form: measure the dense update instead
        pass
    if callable(getattr(module, "get_delta_weight", None)):
        delta = module.get_delta_weight(name).detach()
        return delta.T if getattr(module, "fan_in_fan_out", False) else delta
    return None


def find_targets(model: nn.Module, patterns: Iterable[str]) -> list[Target]:
    """Every module whose canonical name matches a pattern and that holds a 2-D matrix (or an adapter branch)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from peft_ext.stats import canonical_name

    patterns = list(patterns)
    if not patterns:
        raise ValueError("spec_targets is empty: name the matrices to watch, e.g. ['attn.qkv', 'mlp.fc1']")
    regexes = [pattern_regex(p) for p in patterns]
    found: dict[str, Target] = {}
    for raw, module in model.named_modules():
        name = canonical_name(raw)
        if not raw or name in found or not any(r.search(name) for r in regexes):
            continue
        if isinstance(module, BaseTunerLayer):
            if branch_factors(module) is not None:
                found[name] = Target(name, module, None)
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point():
            found[name] = Target(name, module, weight, transposed=type(module).__name__ == "Conv1D")
    if not found:
        raise ValueError(
            f"spec_targets={patterns} matched no 2-D weight or adapter branch of {type(model).__name__}. Use aliases "
            f"{sorted(ALIASES)}, module-name suffixes as in model.named_modules(), or 're:<regex>'."
        )
    return list(found.values())
