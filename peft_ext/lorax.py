"""LoRA-X: move a trained LoRA adapter from a source base model to a target base model, without training.

For each LoRA layer, with `delta W_s = s * B @ A` and the top-k singular vectors `U_s, V_s` (source base weight) and
`U_t, V_t` (target base weight), the default rule maps

    delta W_t = M_U delta W_s M_V^T,   M_X = P_Xt P_Xs + Q_Xt Q_Xs,   P_X = X X^T,  Q_X = I - X X^T

i.e. the part of the adapter inside the source's top subspace lands in the target's top subspace and the part outside
it (the complement, ProLoRA-style) lands in the target's complement. `carry_complement=False` gives the original LoRA-X
projection `P_Ut delta W_s P_Vt`. Baselines in the same report: `copy` (delta W_t = delta W_s) and `delta-sigma`
(the singular-value shifts `diag(U_s^T delta W_s V_s)` put on the target's singular vectors).

Everything runs on the LoRA factors (out x r, r x in) and the (d x k) bases: no out x out or in x in matrix is ever
formed, and the result is re-factorised exactly into a plain LoRA that vanilla PEFT loads.

    from peft_ext.lorax import convert
    report = convert("my-adapter", "org/base-v1", "org/base-v2", "my-adapter-v2")
    print(report)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .files import atomic_directory, atomic_file
from .linalg import top_k_svd
from .lorax_options import METHODS, ON_LOW_SIMILARITY, TransferOptions  # noqa: F401 (re-exported)
from .stats import canonical_name

REPORT_JSON = "lorax_report.json"
REPORT_MD = "lorax_report.md"
# peft-ext adapter types that `peft-ext export-lora` turns into a plain LoRA (which this module then converts)
EXPORTABLE_TYPES = ("NULLSPACE_LORA", "SUBSPACE_LORA")
# Initialisations that rewrite the base weights, so the saved B @ A is not a delta on the published source base.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")

Tensor = torch.Tensor
Factors = tuple[Tensor, Tensor]


# ================================================================================================ the math
def subspace_similarity(x: Tensor, y: Tensor) -> float:
    """phi = ||X^T Y||_F^2 / k for orthonormal bases X (d x k_x), Y (d x k_y), k = min(k_x, k_y): in [0, 1].

    1 when one span contains the other, about k/d for random spans. Dividing by k (not k_x * k_y, as a public
    re-implementation does) is what makes 1 mean "the same subspace". Bases of different dimension d (the
    experimental shape-mismatch path) are compared on their common leading coordinates.
    """
    d = min(x.shape[0], y.shape[0])
    k = min(x.shape[1], y.shape[1])
    m = x[:d].to(torch.float64).T @ y[:d].to(torch.float64)
    return float(min(1.0, max(0.0, float((m * m).sum()) / k)))


def lora_norm2(b: Tensor, a: Tensor) -> float:
    """||B A||_F^2 from the factors: tr((B^T B)(A A^T)), an r x r computation instead of an out x in one."""
    b64, a64 = b.to(torch.float64), a.to(torch.float64)
    return float(((b64.T @ b64) * (a64 @ a64.T)).sum())


def map_columns(x: Tensor, s: Tensor, t: Tensor, carry_complement: bool = True) -> Tensor:
    """`M x` for the (d x d) map M = P_t P_s + Q_t Q_s (or P_t without carry), never forming a d x d matrix.

    `s`, `t` are orthonormal (d x k) bases. With carry, the in-subspace part `P_s x` goes to the target subspace
    through the k x k overlap `t^T s`, and the complement `c = x - P_s x` goes to the target's complement
    `c - t (t^T c)`: two k x r products per term, so the cost is O(d k r).
    """
    if not carry_complement:
        return t @ (t.T @ x)
    sx = s.T @ x
    c = x - s @ sx
    return t @ ((t.T @ s) @ sx) + c - t @ (t.T @ c)


def project_factors(b: Tensor, a: Tensor, us: Tensor, vs: Tensor, ut: Tensor, vt: Tensor,
                    carry_complement: bool = True) -> Factors:
    """(B_t, A_t) with B_t A_t = M_U (B A) M_V^T (LoRA-X, plus the complement carry by default)."""
    return map_columns(b, us, ut, carry_complement), map_columns(a.T, vs, vt, carry_complement).T


def delta_sigma_factors(b: Tensor, a: Tensor, us: Tensor, vs: Tensor, ut: Tensor, vt: Tensor) -> Factors:
    """Delta-Sigma copy: dS = diag(U_s^T B A V_s); delta W_t = U_t diag(dS) V_t^T as factors (U_t diag(dS), V_t^T).

    Only the k diagonal entries are needed: dS_i = sum_j (U_s^T B)_ij (A V_s)_ji. Bases of unequal size are matched
    by index on their first min(k) columns.
    """
    k = min(us.shape[1], vs.shape[1], ut.shape[1], vt.shape[1])
    ds = ((us[:, :k].T @ b) * (a @ vs[:, :k]).T).sum(dim=1)
    return ut[:, :k] * ds, vt[:, :k].T


def index_aligned_factors(b: Tensor, a: Tensor, us: Tensor, vs: Tensor, ut: Tensor, vt: Tensor) -> Factors:
    """The paper's different-shape rule, which degenerates to matching singular vectors by index (experimental).

    delta W_t = U_t[:, :k] (U_s^T B A V_s)[:k, :k] V_t[:, :k]^T with k <= every dimension; as factors
    (U_t[:, :k] (U_s^T B)[:k], (A V_s)[:, :k] V_t[:, :k]^T), still rank <= r.
    """
    k = min(us.shape[1], vs.shape[1], ut.shape[1], vt.shape[1])
    return ut[:, :k] @ (us[:, :k].T @ b), (a @ vs[:, :k]) @ vt[:, :k].T


def energy_rank(singular_values: Tensor, energy: float) -> int:
    """Smallest r' whose top singular values keep at least `energy` of sum(sigma^2) (1 for an all-zero update)."""
    e = singular_values.to(torch.float64) ** 2
    total = float(e.sum())
    if total == 0.0:
        return 1
    frac = torch.cumsum(e, 0) / total
    # the tolerance keeps energy=1.0 from asking for a rank that only round-off would justify
    return min(int((frac < energy - 1e-12).sum()) + 1, e.numel())


def refactor(b: Tensor, a: Tensor, scale: float = 1.0, *, rank: int | None = None,
             energy: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`scale * B A` as an exact rank-r' LoRA `(B', A')` with the scale folded in, and all its singular values.

    Thin QR of B (out x r) and A^T (in x r) reduces the SVD of the out x in product to that of the small core
    `scale * R_B R_A^T` (r x r). r' is `rank` (default: r), or the smallest rank keeping `energy` of the squared
    Frobenius norm. The singular values are split evenly (sqrt on each side), so both factors have comparable norms
    for further fine-tuning. A rank above the number of available directions is padded with zeros.
    """
    if rank is not None and energy is not None:
        raise ValueError("pass rank or energy, not both")
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    uc, sig, vch = torch.linalg.svd(scale * (rb @ ra.T))
    n = energy_rank(sig, energy) if energy is not None else (rank if rank is not None else a.shape[0])
    keep = min(n, sig.numel())
    root = sig[:keep].sqrt()
    b_new = (qb @ uc[:, :keep]) * root
    a_new = root[:, None] * (vch[:keep] @ qa.T)
    if n > keep:
        b_new = torch.cat([b_new, b_new.new_zeros(b_new.shape[0], n - keep)], dim=1)
        a_new = torch.cat([a_new, a_new.new_zeros(n - keep, a_new.shape[1])], dim=0)
    return b_new, a_new, sig


# ================================================================================================ options & report
LAYER_KEYS = ("name", "shape", "phi_u", "phi_v", "energy_kept", "rank", "action")


@dataclass
class LayerTransfer:
    """One layer of the report. `source_norm`/`target_norm`/`baseline_norms` (||delta W||_F) feed the summary."""

    name: str
    shape: list[int]  # [out, in] of the target weight
    phi_u: float
    phi_v: float
    energy_kept: float  # ||delta W_t||_F / ||delta W_s||_F, as written
    rank: int
    action: str  # transferred | kept (low similarity, transferred anyway) | dropped | copied
    source_norm: float = field(default=0.0, repr=False)
    target_norm: float = field(default=0.0, repr=False)
    baseline_norms: dict[str, float] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in LAYER_KEYS}


def _ratio(num2: float, den2: float) -> float:
    """sqrt(num2 / den2); 1.0 for an all-zero adapter (nothing to keep, nothing lost)."""
    return math.sqrt(num2 / den2) if den2 > 0 else 1.0


@dataclass
class TransferReport:
    """What a conversion did, per layer. `print(report)` shows a table; `to_json()` the data (lorax_report.json)."""

    method: str
    source_base: str
    target_base: str
    adapter: str
    settings: dict[str, Any]
    layers: list[LayerTransfer]

    @property
    def summary(self) -> dict[str, Any]:
        actions = [lt.action for lt in self.layers]
        n = max(len(self.layers), 1)
        return {
            "layers": len(self.layers),
            "transferred": sum(a in ("transferred", "kept") for a in actions),
            "dropped": actions.count("dropped"),
            "copied": actions.count("copied"),
            "mean_phi_u": sum(lt.phi_u for lt in self.layers) / n,
            "mean_phi_v": sum(lt.phi_v for lt in self.layers) / n,
            "energy_kept": self._global_energy(lambda lt: lt.target_norm),
        }

    @property
    def baselines(self) -> dict[str, dict[str, float]]:
        return {m: {"energy_kept": self._global_energy(lambda lt, m=m: lt.baseline_norms.get(m, 0.0))}
                for m in ("copy", "delta-sigma")}

    def _global_energy(self, norm: Callable[[LayerTransfer], float]) -> float:
        return _ratio(sum(norm(lt) ** 2 for lt in self.layers), sum(lt.source_norm**2 for lt in self.layers))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "source_base": self.source_base, "target_base": self.target_base,
                "adapter": self.adapter, "settings": self.settings, "layers": [lt.to_dict() for lt in self.layers],
                "summary": self.summary, "baselines": self.baselines}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            f.write(self.to_json() + "\n")

    def plot(self, path: str | os.PathLike) -> str:
        """A PNG of φ_U/φ_V per layer (min_similarity marked) and the energy kept per layer, next to the table.
        Needs matplotlib (`pip install 'peft-ext[demo]'`). Returns `path`."""
        from .plots import plot_transfer_report

        return plot_transfer_report(self, path)

    def _rows(self) -> tuple[list[str], list[list[str]]]:
        head = ["layer", "shape", "φ_U", "φ_V", "energy kept", "rank", "action"]
        rows = [[lt.name, "x".join(map(str, lt.shape)), f"{lt.phi_u:.3f}", f"{lt.phi_v:.3f}", f"{lt.energy_kept:.3f}",
                 str(lt.rank), lt.action] for lt in self.layers]
        return head, rows

    def _headline(self) -> str:
        variant = ""
        if self.method == "lorax":
            variant = " with complement carry" if self.settings.get("carry_complement") else " (top subspace only)"
        return (f"LoRA-X transfer, method {self.method}{variant}: adapter {self.adapter} from {self.source_base} "
                f"to {self.target_base}")

    def _footer(self) -> str:
        s, b = self.summary, self.baselines
        line = (f"{s['layers']} layers: {s['transferred']} transferred, {s['dropped']} dropped, {s['copied']} copied; "
                f"energy kept {s['energy_kept']:.3f} (baselines: copy {b['copy']['energy_kept']:.3f}, "
                f"delta-sigma {b['delta-sigma']['energy_kept']:.3f}); mean φ_U {s['mean_phi_u']:.3f}, "
                f"mean φ_V {s['mean_phi_v']:.3f}")
        if self.settings.get("shape_mismatch_layers"):
            line += (f"\nEXPERIMENTAL: {len(self.settings['shape_mismatch_layers'])} layers of different shapes were "
                     "aligned by singular-vector index (allow_shape_mismatch)")
        return line

    def __str__(self) -> str:
        head, rows = self._rows()
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(cells, widths)))
        lines = [self._headline(), fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        return "\n".join(lines + [self._footer()])

    def to_markdown(self) -> str:
        head, rows = self._rows()
        settings = "\n".join(f"| `{k}` | `{v}` |" for k, v in self.settings.items())
        table = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                          + ["| " + " | ".join(r) + " |" for r in rows])
        return (f"# LoRA-X transfer report\n\n{self._headline()}\n\n## Summary\n\n{self._footer()}\n\n"
                f"## Layers\n\nφ = ‖U_sᵀU_t‖²_F / k (1 = same top-k subspace). Energy kept = ‖ΔW_t‖_F / ‖ΔW_s‖_F.\n\n"
                f"{table}\n\n## Settings\n\n| option | value |\n|---|---|\n{settings}\n")


# ================================================================================================ base weights
def _is_pathlike(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def _hub_download(repo_id: str, patterns: list[str], role: str) -> str:
    """snapshot_download restricted to `patterns` (honours HF_ENDPOINT / HF_HUB_OFFLINE), with a clear error."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:  # not found, offline, invalid id: all mean "this is not something we can read"
        raise ValueError(
            f"{role}={repo_id!r} is not a local directory and could not be fetched from the Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass an existing directory or a "
            "reachable repo id (check HF_ENDPOINT / HF_HUB_OFFLINE)"
        ) from e


class BaseWeights:
    """Read-only access to a base model's weights by key, one tensor at a time (no model class is instantiated).

    From a directory (or Hub repo id) with `model.safetensors` or a sharded `model.safetensors.index.json`, an
    `nn.Module` (its state dict, PEFT wrapper names removed) or a `dict[str, Tensor]`.
    """

    def __init__(self, base: Any, role: str) -> None:
        self.role = role
        self._tensors: Mapping[str, Tensor] | None = None
        self._files: dict[str, str] = {}  # key -> file name (relative to self.dir)
        self._fetch: Callable[[list[str]], str] | None = None
        if isinstance(base, nn.Module):
            self.description = _module_description(base)
            self.name_or_path = getattr(base, "name_or_path", None) or None
            self._tensors = {canonical_name(k): v for k, v in base.state_dict().items() if ".lora_" not in k}
        elif isinstance(base, Mapping):
            self.description, self.name_or_path = "<state dict>", None
            self._tensors = dict(base)
        elif _is_pathlike(base):
            self._open_files(os.fspath(base))
        else:
            raise TypeError(f"{role} must be a directory, a Hub repo id, an nn.Module or a dict of tensors; got "
                            f"{type(base).__name__}")

    def _open_files(self, name: str) -> None:
        self.description = name
        if os.path.isdir(name):
            self.dir, self.name_or_path = name, os.path.abspath(name)
        else:
            self.dir = _hub_download(name, ["model.safetensors.index.json", "model.safetensors", "config.json"],
                                     self.role)
            self.name_or_path = name
            self._fetch = lambda files: _hub_download(name, files, self.role)
        index = os.path.join(self.dir, "model.safetensors.index.json")
        single = os.path.join(self.dir, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                self._files = dict(json.load(f)["weight_map"])
        elif os.path.isfile(single):
            with safe_open(single, "pt") as f:
                self._files = {k: "model.safetensors" for k in f.keys()}
        else:
            other = [f for f in ("pytorch_model.bin", "model.pt") if os.path.isfile(os.path.join(self.dir, f))]
            raise ValueError(
                f"{self.role}={name!r} has no model.safetensors or model.safetensors.index.json"
                + (f" (only {other[0]})" if other else "")
                + ": LoRA-X reads base weights from safetensors; re-save the model with "
                "`model.save_pretrained(path)` (safetensors is the default) or pass the loaded model itself"
            )

    def keys(self) -> set[str]:
        if not hasattr(self, "_keys"):
            self._keys = set(self._tensors) if self._tensors is not None else set(self._files)
        return self._keys

    def prefetch(self, keys: list[str]) -> None:
        """Download the shards holding `keys` (Hub bases only): only the shards a conversion needs."""
        if self._fetch is None:
            return
        files = sorted({self._files[k] for k in keys})
        if any(not os.path.isfile(os.path.join(self.dir, f)) for f in files):
            self.dir = self._fetch(files)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        with safe_open(os.path.join(self.dir, self._files[key]), "pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def get(self, key: str) -> Tensor:
        if self._tensors is not None:
            return self._tensors[key].detach().to("cpu")
        with safe_open(os.path.join(self.dir, self._files[key]), "pt") as f:
            return f.get_tensor(key)

    def find(self, layer: str) -> str | None:
        """The weight key of module `layer`, tolerating a head prefix on either side (`bert.` in a
        BertForSequenceClassification adapter vs a saved BertModel, or the reverse)."""
        want = layer + ".weight"
        keys = self.keys()
        if want in keys:
            return want
        hits = [k for k in keys if k.endswith("." + want) or want.endswith("." + k)]
        return hits[0] if len(hits) == 1 else None


def _module_description(module: nn.Module) -> str:
    name = getattr(module, "name_or_path", None)
    return f"<{type(module).__name__}{' ' + name if name else ''}>"


# ================================================================================================ the adapter
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<name>.+)\.lora_(?P<ab>A|B)(?:\.[^.]+)?\.weight$")


@dataclass
class _Adapter:
    description: str
    config: Any  # peft.LoraConfig
    tensors: dict[str, Tensor]


def _load_adapter(adapter: Any, adapter_name: str, source_base: Any = None) -> _Adapter:
    """A plain LoRA adapter (config + PEFT-keyed tensors) from a directory, a Hub repo id or a PeftModel.

    `source_base` only completes the `peft-ext export-lora` command suggested for a peft-ext adapter.
    """
    from peft import PeftModel

    if isinstance(adapter, PeftModel):
        if adapter_name not in adapter.peft_config:
            raise ValueError(f"adapter_name={adapter_name!r} is not an adapter of this PeftModel; it has "
                             f"{sorted(adapter.peft_config)}")
        config = adapter.peft_config[adapter_name]
        _check_peft_type(_type_name(config.peft_type), f"PeftModel adapter {adapter_name!r}",
                         f"peft_ext.export_to_lora(model, LORA_DIR, adapter_name={adapter_name!r})")
        from peft import get_peft_model_state_dict

        tensors = get_peft_model_state_dict(adapter, adapter_name=adapter_name)
        return _Adapter(f"<PeftModel adapter {adapter_name!r}>", config,
                        {k: v.detach().to("cpu") for k, v in tensors.items()})
    if not _is_pathlike(adapter):
        raise TypeError(f"adapter must be an adapter directory, a Hub repo id or a PeftModel; got "
                        f"{type(adapter).__name__}")
    name = os.fspath(adapter)
    path = name if os.path.isdir(name) else _hub_download(
        name, ["adapter_config.json", "adapter_model.safetensors"], "adapter")
    from .hub import read_adapter_config  # the one reader: JSON object with a peft_type, errors naming file and fix

    raw = read_adapter_config(path, field="adapter")
    base = os.fspath(source_base) if _is_pathlike(source_base) else "SOURCE_BASE"
    export = f"peft-ext export-lora {name} {name.rstrip('/')}-lora --base {base}"
    _check_peft_type(str(raw.get("peft_type")), f"adapter={name!r}", f"`{export}`")
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(path)
    weights = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise ValueError(f"adapter={name!r} has no adapter_model.safetensors; re-save it with "
                         "`peft_model.save_pretrained(dir)` (safetensors is the default)")
    return _Adapter(name, config, load_file(weights))


def _type_name(peft_type: Any) -> str:
    return str(getattr(peft_type, "value", peft_type))


def _check_peft_type(peft_type: str, where: str, export: str) -> None:
    if peft_type == "LORA":
        return
    if peft_type in EXPORTABLE_TYPES:
        raise ValueError(
            f"{where} has peft_type={peft_type!r}, a peft-ext adapter; LoRA-X converts plain LoRA adapters. Export it "
            f"as an exactly equivalent plain LoRA first: {export}, then convert that directory"
        )
    raise ValueError(f"{where} has peft_type={peft_type!r}: LoRA-X only converts LoRA adapters (delta W = B A) and "
                     f"there is no conversion path from {peft_type}; train a LoRA adapter instead")


def _lora_layers(ad: _Adapter, opts: TransferOptions) -> dict[str, tuple[str, str]]:
    """layer name -> (lora_A key, lora_B key), after refusing everything that is not a plain linear LoRA."""
    cfg = ad.config
    if getattr(cfg, "use_dora", False):
        raise ValueError(f"adapter {ad.description} uses DoRA (use_dora=True): its magnitude vector rescales the whole "
                         "weight W + delta W, which a subspace transfer of delta W cannot carry; use a plain LoRA")
    if getattr(cfg, "lora_bias", False):
        raise ValueError(f"adapter {ad.description} has lora_bias=True: its lora_B bias is an extra output shift, not "
                         "part of delta W = B A, and has no subspace to transfer; use an adapter without lora_bias")
    init = getattr(cfg, "init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise ValueError(f"adapter {ad.description} has init_lora_weights={init!r}, which rewrites the base weights, "
                         "so B A is not a delta on the source base; save it as a plain LoRA first with "
                         "`save_pretrained(dir, path_initial_model_for_weight_conversion=...)`")
    layers: dict[str, dict[str, str]] = {}
    other = []
    for key, value in ad.tensors.items():
        if "lora_embedding_" in key:
            raise ValueError(f"adapter layer {_layer_of(key)!r} is a LoRA on an embedding: LoRA-X transfers linear "
                             "layers only; remove it from target_modules and retrain, or convert without it")
        if "lora_magnitude_vector" in key:
            raise ValueError(f"adapter key {key!r} is a DoRA magnitude vector: DoRA adapters cannot be transferred")
        m = _LORA_KEY.match(key)
        if m is None:
            other.append(key)
            continue
        if value.dim() != 2:
            raise ValueError(f"adapter layer {m['name']!r} has a {value.dim()}-D lora_{m['ab']} "
                             f"({tuple(value.shape)}): a LoRA on a convolution; LoRA-X transfers linear layers only")
        layers.setdefault(m["name"], {})[m["ab"]] = key
    if other and not opts.drop_modules_to_save:
        to_save = sorted(getattr(cfg, "modules_to_save", None) or [])
        raise ValueError(
            f"adapter {ad.description} holds tensors that are not LoRA factors ({', '.join(other[:3])}"
            f"{', ...' if len(other) > 3 else ''}; modules_to_save={to_save}, bias={getattr(cfg, 'bias', 'none')!r}): "
            "they are full copies of source-model modules, not deltas, and cannot be transferred. Pass "
            "drop_modules_to_save=True (--drop-modules-to-save) to leave them out (the target keeps its own)"
        )
    if not layers:
        raise ValueError(f"adapter {ad.description} has no lora_A/lora_B weights to transfer")
    for name, pair in layers.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"adapter layer {name!r} has only lora_{''.join(pair)}; the adapter file is incomplete")
    return {n: (p["A"], p["B"]) for n, p in layers.items()}


def _layer_of(key: str) -> str:
    key = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
    return key.split(".lora_")[0]


def _scale(cfg: Any, name: str, r: int) -> float:
    """lora_alpha / r (or / sqrt(r) with rsLoRA), honouring alpha_pattern like PEFT does."""
    from peft.utils.other import get_pattern_key

    alpha = cfg.lora_alpha
    if cfg.alpha_pattern:
        key = get_pattern_key(list(cfg.alpha_pattern), name)
        alpha = cfg.alpha_pattern.get(key, alpha)
    return alpha / math.sqrt(r) if cfg.use_rslora else alpha / r


# ================================================================================================ checks & plan
def _normalise_base(name: str) -> str:
    return os.path.realpath(name) if os.path.isdir(name) else name.rstrip("/")


def _same_base(recorded: str, given: str) -> bool:
    """Whether the adapter's base_model_name_or_path names `given` (resolved paths, repo ids, or a local
    snapshot of that repo in a Hub cache: .../models--org--name/snapshots/<rev>)."""
    a, b = _normalise_base(recorded), _normalise_base(given)
    if a == b:
        return True
    for path, repo in ((a, recorded), (b, given)):
        if os.path.isabs(path) and f"models--{repo.replace('/', '--')}" in path.split(os.sep):
            return True
    return False


@dataclass
class _LayerPlan:
    name: str
    key_a: str
    key_b: str
    source_key: str
    target_key: str
    source_shape: tuple[int, int]
    target_shape: tuple[int, int]
    r: int
    scale: float
    out_rank: int | None


def _oriented_shape(shape: tuple[int, ...], fan_in_fan_out: bool) -> tuple[int, int]:
    return (shape[1], shape[0]) if fan_in_fan_out else (shape[0], shape[1])


def _plan(ad: _Adapter, layers: dict[str, tuple[str, str]], src: BaseWeights, tgt: BaseWeights,
          opts: TransferOptions) -> list[_LayerPlan]:
    """Match every layer to both bases and check shapes and ranks: all input errors surface before any SVD."""
    for base in (src, tgt):
        missing = [n for n in layers if base.find(n) is None]
        if missing:
            raise ValueError(
                f"{len(missing)} adapter layers have no weight in {base.role}={base.description!r}: "
                f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; source and target must have the "
                "same architecture (module names) as the base the adapter was trained on"
            )
        base.prefetch([base.find(n) for n in layers])  # Hub bases: fetch only the shards holding these layers
    fifo = bool(getattr(ad.config, "fan_in_fan_out", False))
    plan = []
    for name, (ka, kb) in sorted(layers.items()):
        a, b = ad.tensors[ka], ad.tensors[kb]
        sk, tk = src.find(name), tgt.find(name)
        s_raw, t_raw = src.shape(sk), tgt.shape(tk)
        for role, raw in ((src.role, s_raw), (tgt.role, t_raw)):
            if len(raw) != 2:
                raise ValueError(f"layer {name!r}: the {role} weight has shape {tuple(raw)}, not a 2-D linear weight; "
                                 "LoRA-X transfers linear layers only")
        s_shape, t_shape = _oriented_shape(s_raw, fifo), _oriented_shape(t_raw, fifo)
        if s_shape != (b.shape[0], a.shape[1]):
            raise ValueError(
                f"layer {name!r}: the adapter's factors give a ({b.shape[0]}, {a.shape[1]}) update but the "
                f"{src.role} weight is {s_shape} (out, in) (fan_in_fan_out={fifo}); pass the base the adapter was "
                "trained on" + ("" if fifo else ", or set fan_in_fan_out for Conv1D (GPT-2 style) layers")
            )
        if s_shape != t_shape and not opts.allow_shape_mismatch:
            raise ValueError(
                f"layer {name!r}: source weight {s_shape} and target weight {t_shape} differ in shape; LoRA-X "
                "transfers between bases of the same shapes. allow_shape_mismatch=True (--allow-shape-mismatch) "
                "enables an experimental alignment by singular-vector index, which the paper never tested"
            )
        low_copy = opts.on_low_similarity == "copy" and opts.min_similarity > 0
        if s_shape != t_shape and (opts.method == "copy" or low_copy):
            raise ValueError(f"layer {name!r}: source {s_shape} and target {t_shape} differ in shape, so "
                             f"method/on_low_similarity='copy' cannot copy it; use method='lorax' with "
                             "on_low_similarity 'keep' or 'drop'")
        limit = min(t_shape)
        if opts.rank is not None and opts.rank > limit:
            raise ValueError(f"rank={opts.rank} exceeds layer {name!r}'s limit min(out, in) = {limit} for its "
                             f"{t_shape} target weight; choose rank <= {limit}")
        r = a.shape[0]
        out_rank = opts.rank if opts.rank is not None else (None if opts.energy is not None else min(r, limit))
        plan.append(_LayerPlan(name, ka, kb, sk, tk, s_shape, t_shape, r, _scale(ad.config, name, r), out_rank))
    return plan


# ================================================================================================ SVD cache
def default_cache_dir() -> str:
    from huggingface_hub import constants

    return os.path.join(constants.HF_HOME, "peft_ext", "lorax_svd")


def fingerprint(w: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes.

    The cache key is the weight itself, not its file's path + size + mtime: re-saving weights of the same shapes
    always gives the same size, so that key would rest on the mtime alone, which a rewrite within the filesystem's
    timestamp resolution, or a copy that keeps timestamps (cp -p, rsync -t, tar), leaves unchanged: a stale SVD.
    Bytes cannot go stale, and they also cover weights that have no file (a module, a state dict). Hashing costs
    about 1 s per GB, far less than the SVD it saves.
    """
    h = hashlib.sha256(f"{w.dtype}|{tuple(w.shape)}|".encode())
    h.update(w.detach().contiguous().cpu().view(torch.uint8).numpy().data)
    return h.hexdigest()


_CACHE_ENTRY = re.compile(r"[0-9a-f]+-k\d+-(exact|randomized-o\d+-n\d+-s\d+)\.safetensors")


class SvdCache:
    """top-k SVDs of base weights, memoised in memory and cached as safetensors under `directory` (None: no disk).

    Keyed by the weight's fingerprint, k and the decomposition (exact, or randomized with its oversample, niter and
    seed); files are written to a temporary name and renamed, so a crash never leaves a truncated entry.
    """

    def __init__(self, directory: str | None, opts: TransferOptions) -> None:
        self.dir, self.opts = directory, opts
        self._memo: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self.hits = self.misses = self.evicted = 0

    def method(self, shape: tuple[int, int]) -> str:
        o = self.opts
        return "exact" if min(shape) <= o.exact_max_dim else f"randomized-o{o.oversample}-n{o.niter}-s{o.seed}"

    def __call__(self, w: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        key = f"{fingerprint(w)}-k{k}-{self.method(tuple(w.shape))}"
        if key in self._memo:
            self.hits += 1
            return self._memo[key]
        path = os.path.join(self.dir, key + ".safetensors") if self.dir else None
        usv = self._read(path, w, k) if path else None
        if usv is None:
            self.misses += 1
            o = self.opts
            usv = top_k_svd(w, k, exact_max_dim=o.exact_max_dim, oversample=o.oversample, niter=o.niter,
                            generator=torch.Generator().manual_seed(o.seed))
            if path:
                self._write(path, usv, key)
        else:
            self.hits += 1
            with contextlib.suppress(OSError):  # a read counts as a use: least recently used goes first
                os.utime(path)
        self._memo[key] = usv
        return usv

    def prune(self) -> None:
        """Remove the least recently used entries until the folder holds at most `cache_max_gb` of them. Only files
        named as this cache names its entries are counted and removed; anything else in the folder is left alone."""
        if not self.dir or not os.path.isdir(self.dir):
            return
        entries = []
        for name in os.listdir(self.dir):
            if _CACHE_ENTRY.fullmatch(name):
                with contextlib.suppress(OSError):
                    st = os.stat(os.path.join(self.dir, name))
                    entries.append((st.st_mtime, st.st_size, name))
        limit = self.opts.cache_max_gb * 1e9
        total = sum(size for _, size, _ in entries)
        for _, size, name in sorted(entries):
            if total <= limit:
                break
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.dir, name))
                self.evicted += 1
            total -= size

    @staticmethod
    def _read(path: str, w: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor] | None:
        if not os.path.isfile(path):
            return None
        try:
            t = load_file(path)
            usv = (t["U"], t["S"], t["V"])
        except Exception:  # a damaged entry is recomputed (and rewritten), never trusted
            return None
        if usv[0].shape != (w.shape[0], k) or usv[2].shape != (w.shape[1], k):
            return None
        return usv

    def _write(self, path: str, usv: tuple[Tensor, Tensor, Tensor], key: str) -> None:
        try:
            # atomic_file: fsynced, umask permissions (mkstemp's were owner-only), killed writers' temporaries removed
            with atomic_file(path, field="cache_dir") as tmp:
                save_file({"U": usv[0].contiguous(), "S": usv[1].contiguous(), "V": usv[2].contiguous()}, tmp,
                          metadata={"key": key})
            self.prune()
        except OSError as e:  # a read-only cache slows the next run down; it must not fail this one
            warnings.warn(f"could not write the LoRA-X SVD cache in {self.dir!r} ({e}); continuing without it "
                          "(set cache_dir / --cache-dir to a writable directory)", stacklevel=3)


# ================================================================================================ one layer
def _oriented(w: Tensor, fan_in_fan_out: bool) -> Tensor:
    return w.T.contiguous() if fan_in_fan_out else w


def _formula(method: str, b: Tensor, a: Tensor, bases: tuple[Tensor, ...], carry: bool, same_shape: bool) -> Factors:
    """Unscaled target factors of `method` (the scale is applied by `refactor`)."""
    if method == "copy":
        return b, a
    if method == "delta-sigma":
        return delta_sigma_factors(b, a, *bases)
    if not same_shape:
        return index_aligned_factors(b, a, *bases)
    return project_factors(b, a, *bases, carry_complement=carry)


def _transfer_layer(p: _LayerPlan, ad: _Adapter, src: BaseWeights, tgt: BaseWeights, svd: SvdCache,
                    opts: TransferOptions, fifo: bool) -> tuple[LayerTransfer, Factors | None]:
    """The report row and the factors (B' with the scale folded in, A') written for one layer (None if dropped)."""
    ws, wt = _oriented(src.get(p.source_key), fifo), _oriented(tgt.get(p.target_key), fifo)
    us, _, vs = svd(ws, min(opts.subspace_rank, *ws.shape))
    ut, _, vt = svd(wt, min(opts.subspace_rank, *wt.shape))
    bases = tuple(x.to(torch.float64) for x in (us, vs, ut, vt))
    a64, b64 = ad.tensors[p.key_a].to(torch.float64), ad.tensors[p.key_b].to(torch.float64)
    phi_u, phi_v = subspace_similarity(bases[0], bases[2]), subspace_similarity(bases[1], bases[3])
    same = p.source_shape == p.target_shape
    source_norm = abs(p.scale) * math.sqrt(max(lora_norm2(b64, a64), 0.0))

    def run(method: str) -> tuple[Tensor, Tensor, float]:
        b_t, a_t = _formula(method, b64, a64, bases, opts.carry_complement, same)
        b_n, a_n, sig = refactor(b_t, a_t, p.scale, rank=p.out_rank, energy=opts.energy)
        kept = sig[: min(a_n.shape[0], sig.numel())]
        return b_n, a_n, float(torch.sqrt((kept.to(torch.float64) ** 2).sum()))

    baseline_norms = {m: run(m)[2] if (m != "copy" or same) else 0.0 for m in ("copy", "delta-sigma")}
    low = min(phi_u, phi_v) < opts.min_similarity
    if low and opts.on_low_similarity == "drop":
        row = LayerTransfer(p.name, list(p.target_shape), phi_u, phi_v, 0.0, 0, "dropped", source_norm, 0.0,
                            baseline_norms)
        return row, None
    method = "copy" if low and opts.on_low_similarity == "copy" else opts.method
    b_n, a_n, norm = run(method)
    action = "copied" if method == "copy" else ("kept" if low else "transferred")
    row = LayerTransfer(p.name, list(p.target_shape), phi_u, phi_v, _ratio(norm**2, source_norm**2), a_n.shape[0],
                        action, source_norm, norm, baseline_norms)
    return row, (b_n, a_n)


# ================================================================================================ public API
def _describe(x: Any) -> str:
    if _is_pathlike(x):
        return os.fspath(x)
    if isinstance(x, nn.Module):
        return _module_description(x)
    return "<state dict>"


def _target_config(cfg: Any, ranks: dict[str, int], dropped: list[str], target_name: str | None,
                   drop_extra: bool) -> Any:
    """The LoraConfig of the converted adapter: the source's, with scaling folded into B (lora_alpha = rank per
    layer, so the scale is 1), per-layer ranks as rank_pattern, dropped layers excluded, the target as base."""
    from peft import LoraConfig

    d = cfg.to_dict()
    r = max(ranks.values())
    pattern = lambda values: {re.escape(n): v for n, v in values.items() if v != r}  # noqa: E731
    exclude = d.get("exclude_modules") or []
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    d.update(r=r, lora_alpha=r, rank_pattern=pattern(ranks), alpha_pattern=pattern(ranks), use_rslora=False,
             base_model_name_or_path=target_name, revision=None, init_lora_weights=True, inference_mode=True,
             exclude_modules=(exclude + sorted(dropped)) or None)
    if drop_extra:
        d.update(modules_to_save=None, bias="none")
    return LoraConfig(**d)


def transfer(adapter: Any, source_base: Any, target_base: Any, **options: Any) -> tuple[dict[str, Tensor], Any,
                                                                                        TransferReport]:
    """Compute a LoRA-X conversion in memory: (adapter tensors with PEFT keys, peft.LoraConfig, TransferReport).

    `convert` writes this to a directory; options are the fields of `TransferOptions`.
    """
    opts = TransferOptions(**options)
    ad = _load_adapter(adapter, opts.adapter_name, source_base)
    layers = _lora_layers(ad, opts)
    recorded = getattr(ad.config, "base_model_name_or_path", None)
    if _is_pathlike(source_base) and recorded and not opts.force and not _same_base(recorded, os.fspath(source_base)):
        raise ValueError(
            f"the adapter's base_model_name_or_path={recorded!r} differs from source_base={os.fspath(source_base)!r}: "
            "the adapter was trained on another base. Pass that base as source_base, or force=True (--force) if both "
            "name the same weights"
        )
    src, tgt = BaseWeights(source_base, "source_base"), BaseWeights(target_base, "target_base")
    plan = _plan(ad, layers, src, tgt, opts)
    mismatched = [p for p in plan if p.source_shape != p.target_shape]
    if mismatched:
        first = mismatched[0]
        warnings.warn(f"EXPERIMENTAL: {len(mismatched)} layers differ in shape between source and target "
                      f"({first.name}: {first.source_shape} -> {first.target_shape}, ...); they are aligned by "
                      "singular-vector index, a rule the LoRA-X paper never tested. Check the result before use.",
                      stacklevel=2)
    cache_dir = (opts.cache_dir or default_cache_dir()) if opts.cache else None
    svd = SvdCache(cache_dir, opts)
    fifo = bool(getattr(ad.config, "fan_in_fan_out", False))

    from ._progress import progress_bar

    rows, tensors, ranks, dropped = [], {}, {}, []
    for p in progress_bar(plan, enabled=opts.progress, desc="LoRA-X", unit="layer"):
        row, factors = _transfer_layer(p, ad, src, tgt, svd, opts, fifo)
        rows.append(row)
        if factors is None:
            dropped.append(p.name)
            continue
        dtype = ad.tensors[p.key_a].dtype
        tensors[p.key_b] = factors[0].to(dtype).contiguous()
        tensors[p.key_a] = factors[1].to(dtype).contiguous()
        ranks[p.name] = row.rank
    if not tensors:
        raise ValueError(f"every layer fell below min_similarity={opts.min_similarity} and was dropped: nothing to "
                         "write; lower min_similarity or use on_low_similarity='keep'")
    settings = {**asdict(opts), "cache_dir": cache_dir, "experimental": bool(mismatched),
                "shape_mismatch_layers": [p.name for p in mismatched], "svd_cache_hits": svd.hits,
                "svd_computed": svd.misses}
    report = TransferReport(opts.method, src.description, tgt.description, ad.description, settings, rows)
    target_name = opts.target_name or tgt.name_or_path
    if target_name is None:
        warnings.warn("the converted adapter's config names no base model (the target was passed as a module or "
                      "state dict without a name_or_path); pass target_name= (--target-name) with its Hub id or "
                      "folder so that AutoPeftModel and the Hub card can find it", stacklevel=2)
    config = _target_config(ad.config, ranks, dropped, target_name, opts.drop_modules_to_save)
    return tensors, config, report


def convert(adapter: Any, source_base: Any, target_base: Any, out_dir: str | os.PathLike, *,
            overwrite: bool = False, **options: Any) -> TransferReport:
    """Transfer a plain LoRA adapter to `target_base` and write it to `out_dir` (PEFT layout + lorax_report.*).

    `adapter`: adapter directory, Hub repo id or PeftModel. `source_base`/`target_base`: model directory or Hub repo
    id (weights read from safetensors, only the needed tensors), an nn.Module, or a state dict. `options`: the fields
    of `TransferOptions` (method, rank | energy, subspace_rank, carry_complement, min_similarity, ...).
    `peft.PeftModel.from_pretrained(target_model, out_dir)` loads the result. The directory appears complete or not
    at all; an existing one is refused unless `overwrite=True`.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"out_dir={out_dir!r} exists; pass overwrite=True (--overwrite) or choose another "
                              "directory")
    tensors, config, report = transfer(adapter, source_base, target_base, **options)
    _write_atomic(out_dir, tensors, config, report, overwrite)
    return report


def _write_atomic(out_dir: str, tensors: dict[str, Tensor], config: Any, report: TransferReport,
                  overwrite: bool) -> None:
    """Write into a temporary directory beside `out_dir`, then rename it into place."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        report.save_json(os.path.join(tmp, REPORT_JSON))
        _write_markdown(os.path.join(tmp, REPORT_MD), report)


def _write_markdown(path: str, report: TransferReport) -> None:
    with open(path, "w") as f:
        f.write(report.to_markdown())


__all__ = [
    "BaseWeights",
    "LayerTransfer",
    "SvdCache",
    "TransferOptions",
    "TransferReport",
    "convert",
    "default_cache_dir",
    "delta_sigma_factors",
    "energy_rank",
    "fingerprint",
    "index_aligned_factors",
    "lora_norm2",
    "map_columns",
    "project_factors",
    "refactor",
    "subspace_similarity",
    "transfer",
]
