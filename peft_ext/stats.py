"""Streaming activation statistics: the uncentred input covariance C = E[x x^T] of chosen linear layers.

Used by NullSpaceLoRA (its tail eigenvectors) and later by OrthoSplit (an OBS-style Hessian proxy). Design points:

* any batch size; padding tokens are dropped with the batch's attention mask;
* sums are accumulated in float64 by default (configurable), normalised only when read, and stored packed: a sum of
  x x^T is symmetric, so only its 128 x 128 tiles on and above the diagonal are kept and computed (a blocked
  symmetric rank-k update: about half the numbers and half the products of the full d x d sum, no d x d temporary).
  Float64 sums then take less memory than float32 full matrices (a SmolLM2 decoder layer: 14.9 MB for its four
  distinct inputs, where PEFT's CorDA holds seven float32 covariances, 17.4 MB); `covariance(name)` unpacks one
  layer at a time;* layers that read the very same input tensor (q/k/v of an attention block, gate/up of a Llama MLP) are computed
  once: on the first batch each layer either owns its statistics or is an alias of the layer whose input it shares;
* 2-D inputs (a BERT pooler) and 3-D inputs (tokens) both work;
* a NaN/Inf input raises an error naming the layer and the batch;
* under torch.distributed (e.g. `accelerate launch` with several processes) the sums are all-reduced, so N processes
  that each see 1/N of the data give the covariance one process gets from all of it;
* `save`/`load` use safetensors with JSON metadata; `load` checks the whole file (format version, every layer's
  tensor, dtype, shape, finiteness and token count) and names what is wrong in one line;
* collected statistics record the model they came from (`model_fingerprint` plus one digest per weight tensor), so
  `initialize_nullspace_lora` can refuse statistics of another model that happens to have the same shapes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ._checks import all_finite, nonfinite_count
from ._progress import progress_bar
from .bnb_cpu import bnb_cpu_repack_disabled

FORMAT = "peft_ext.activation_stats"
FORMAT_VERSION = "2"  # 2: each sum packed (1-D, pack_symmetric's 128 x 128 tiles; header block_size); 1: (d, d)
READABLE_VERSIONS = ("1", "2")


# ------------------------------------------------------------------------------------ packed symmetric sums


BLOCK = 128  # side of the blocks a packed sum is stored in (fixed: it defines the file layout)


@functools.lru_cache(maxsize=64)
def _layout(n: int) -> tuple[tuple[int, int, int, int, int], ...]:
    """The blocks on and above the diagonal of an (n, n) matrix cut into BLOCK x BLOCK tiles (the last row/column of
    tiles narrower): (row0, row1, col0, col1, offset) in storage order, row of tiles by row of tiles."""
    edges = list(range(0, n, BLOCK)) + [n]
    out, offset = [], 0
    for i in range(len(edges) - 1):
        for j in range(i, len(edges) - 1):
            r0, r1, c0, c1 = edges[i], edges[i + 1], edges[j], edges[j + 1]
            out.append((r0, r1, c0, c1, offset))
            offset += (r1 - r0) * (c1 - c0)
    return tuple(out)


def packed_length(n: int) -> int:
    """Numbers a packed (n, n) symmetric matrix takes: its tiles on and above the diagonal, (n^2 + sum b_i^2) / 2,
    about n (n + BLOCK) / 2 (half of n^2 for large n)."""
    r0, r1, c0, c1, offset = _layout(n)[-1]
    return offset + (r1 - r0) * (c1 - c0)


def packed_dim(length: int) -> int | None:
    """n such that packed_length(n) == length, or None when no n gives that length."""
    if length < 1:
        return None
    guess = math.isqrt(2 * length)
    for n in range(max(1, guess - BLOCK), guess + 2):
        if packed_length(n) == length:
            return n
    return None


def pack_symmetric(m: torch.Tensor) -> torch.Tensor:
    """A symmetric (n, n) matrix as 1-D storage: its BLOCK x BLOCK tiles on and above the diagonal, each row-major,
    row of tiles by row of tiles (the diagonal tiles whole). The inverse is `unpack_symmetric`."""
    return torch.cat([m[r0:r1, c0:c1].reshape(-1) for r0, r1, c0, c1, _ in _layout(m.shape[0])])


def _tiles(packed: torch.Tensor, n: int):
    for r0, r1, c0, c1, offset in _layout(n):
        yield r0, r1, c0, c1, packed[offset : offset + (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)


def unpack_symmetric(packed: torch.Tensor) -> torch.Tensor:
    """The symmetric (n, n) matrix stored in `packed` (see `pack_symmetric`)."""
    n = packed_dim(packed.numel()) if packed.dim() == 1 else None
    if n is None:
        raise ValueError(f"a packed symmetric matrix is 1-D with packed_length(n) entries, got shape "
                         f"{tuple(packed.shape)}")
    full = torch.empty(n, n, dtype=packed.dtype, device=packed.device)
    for r0, r1, c0, c1, tile in _tiles(packed, n):
        full[r0:r1, c0:c1] = tile
        if r0 != c0:
            full[c0:c1, r0:r1] = tile.T
    return full


def packed_diagonal_index(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Positions of the diagonal entries (i, i) in packed storage."""
    parts = [offset + torch.arange(r1 - r0, device=device) * (r1 - r0 + 1)
             for r0, r1, c0, c1, offset in _layout(n) if r0 == c0]
    return torch.cat(parts)


def add_gram_(packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """packed += pack_symmetric(x^T x) for rows x (tokens, n), computing only the tiles on and above the diagonal
    (a blocked symmetric rank-k update: (n^2 + sum b_i^2) / 2 products per token instead of n^2, and no (n, n)
    temporary)."""
    n = x.shape[1]
    for r0, r1, c0, c1, tile in _tiles(packed, n):
        tile.addmm_(x[:, r0:r1].T, x[:, c0:c1])
    return packed


def _sum_dim(s: torch.Tensor) -> int | None:
    """d of a stored sum: (d, d) full or packed 1-D; None if it is neither."""
    if s.dim() == 2 and s.shape[0] == s.shape[1] and s.shape[0] > 0:
        return int(s.shape[0])
    if s.dim() == 1:
        return packed_dim(s.numel())
    return None


def _sum_diagonal(s: torch.Tensor) -> torch.Tensor:
    return s.diagonal() if s.dim() == 2 else s[packed_diagonal_index(_sum_dim(s), s.device)]


class _SumsView(MutableMapping):
    """`ActivationStats.sums`: layer -> (d, d) sum of x x^T. Sums are stored packed; reading one through this view
    unpacks it and keeps the full matrix in its place (so editing it in place, then `validate()`, works as before).
    Use `ActivationStats.covariance(name)` to read without keeping a full copy."""

    def __init__(self, store: dict[str, torch.Tensor]) -> None:
        self._store = store

    def __getitem__(self, name: str) -> torch.Tensor:
        s = self._store[name]
        if s.dim() == 1:
            s = self._store[name] = unpack_symmetric(s)
        return s

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self._store[name] = value

    def __delitem__(self, name: str) -> None:
        del self._store[name]

    def __iter__(self):
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"<activation sums of {len(self)} layers: {list(self._store)[:4]}...>"


def canonical_name(name: str) -> str:
    """The module name as it is in the plain base model: PEFT's wrapper prefixes and `.base_layer` hops removed.

    Statistics collected on a plain model therefore apply to the same model wrapped by `get_peft_model`.
    """
    # Wrappers nest in any order (DDP's "module." around PEFT's "base_model.model.", torch.compile's "_orig_mod."...)
    prefixes = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "base_model.model.")
    while (hit := next((p for p in prefixes if name.startswith(p)), None)) is not None:
        name = name[len(hit) :]
    return name.replace(".base_layer", "")


def find_linear_targets(model: nn.Module, target_modules: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """Map canonical name -> module for the layers whose inputs we track.

    With `target_modules=None`: the PEFT tuner layers of a PEFT model, or every linear layer of a plain model.
    Otherwise each entry matches a module whose canonical name equals it or ends with `.<entry>`. The outermost
    module wins when a wrapper and its base layer share a canonical name.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    wanted = None if target_modules is None else list(target_modules)
    has_tuners = any(isinstance(m, BaseTunerLayer) for m in model.modules())
    found: dict[str, nn.Module] = {}
    for raw_name, module in model.named_modules():
        name = canonical_name(raw_name)
        if name in found or not raw_name or linear_in_features(module) is None:
            continue
        if wanted is None:
            ok = isinstance(module, BaseTunerLayer) or not has_tuners
        else:
            ok = any(name == w or name.endswith("." + w) for w in wanted)
        if ok:
            found[name] = module
    if not found:
        what = "linear layers" if wanted is None else f"linear layers matching {wanted}"
        raise ValueError(
            f"target_modules={wanted!r} matched no layer of {type(model).__name__}: found no {what}. "
            "Pass names as they appear in model.named_modules() (a full name or its last components, e.g. 'query')."
        )
    return found


def linear_in_features(module: nn.Module) -> int | None:
    """Input width of a linear layer (nn.Linear incl. bitsandbytes' subclasses, Conv1D, or a PEFT layer around
    one); None for anything else, whose input a covariance of x x^T would not describe."""
    from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
    from transformers.pytorch_utils import Conv1D

    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    return _get_in_out_features(base)[0] if isinstance(base, (nn.Linear, Conv1D)) else None


class ActivationStats:
    """Per-layer sums of x x^T and token counts. Read normalised covariances with `covariance(name)`.

    `sums` may hold (d, d) matrices or packed sums (1-D, `pack_symmetric`); collected statistics are
    packed. `stats.sums[name]` always gives the (d, d) matrix.
    """

    def __init__(
        self,
        sums: dict[str, torch.Tensor],
        tokens: dict[str, int],
        aliases: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.sums = sums
        self.tokens = tokens
        self.aliases = dict(aliases or {})
        self.metadata = dict(metadata or {})
        problem = _stats_problem(self._sums, self.tokens, self.aliases)
        if problem:
            raise ValueError(f"invalid activation statistics: {problem}; collect them with ActivationStats.collect")

    def validate(self) -> None:
        """Raise a ValueError naming the first layer whose statistics cannot be a sum of x x^T over a token count:
        a missing or non-integer or negative count, a tensor that is not a finite square float matrix with a
        non-negative diagonal, an alias without an owner. The constructor and `load` run it; run it again after
        editing `sums`/`tokens` by hand (`initialize_nullspace_lora` does, before it writes anything)."""
        problem = _stats_problem(self._sums, self.tokens, self.aliases)
        if problem:
            raise ValueError(f"invalid activation statistics: {problem}; recollect them with ActivationStats.collect")

    @property
    def sums(self) -> MutableMapping:
        return _SumsView(self._sums)

    @sums.setter
    def sums(self, value: Any) -> None:
        if isinstance(value, _SumsView):
            value = value._store
        self._sums = value if isinstance(value, dict) or not isinstance(value, Mapping) else dict(value)

    # ---------------------------------------------------------------- reading
    @property
    def layers(self) -> list[str]:
        """Every layer with statistics, owners and aliases alike, in collection order."""
        return list(self._sums) + [a for a in self.aliases if a not in self._sums]

    def owner(self, name: str) -> str:
        """The layer whose statistics `name` shares (itself if it owns them)."""
        if name in self._sums:
            return name
        if name in self.aliases:
            return self.aliases[name]
        raise KeyError(f"no statistics for layer {name!r}; layers with statistics: {self.layers[:8]}...")

    def __contains__(self, name: str) -> bool:
        return name in self._sums or name in self.aliases

    def token_count(self, name: str) -> int:
        return int(self.tokens[self.owner(name)])

    def dim(self, name: str) -> int:
        return int(_sum_dim(self._sums[self.owner(name)]))

    def trace(self, name: str) -> float:
        """The trace of the sum of x x^T of `name` (the total squared norm of its inputs), without unpacking it."""
        return float(_sum_diagonal(self._sums[self.owner(name)]).sum())

    def covariance(self, name: str) -> torch.Tensor:
        """E[x x^T] over the non-padding tokens that reached `name`, in the accumulation dtype: a new (d, d) tensor
        (the stored sum stays packed)."""
        owner = self.owner(name)
        n = self.tokens[owner]
        if n == 0:
            raise ValueError(f"calibration reached layer {name!r} with zero tokens; feed data that reaches it")
        s = self._sums[owner]
        return unpack_symmetric(s).div_(n) if s.dim() == 1 else s / n

    def __repr__(self) -> str:
        return (
            f"ActivationStats({len(self._sums)} distinct inputs for {len(self.layers)} layers, "
            f"tokens={max(self.tokens.values(), default=0)}, dtype={next(iter(self._sums.values())).dtype if self._sums else None})"
        )

    # ---------------------------------------------------------------- distributed
    def all_reduce_(self) -> "ActivationStats":
        """Sum statistics over all ranks of an initialised torch.distributed group (no-op otherwise).

        Every rank must call it. Ranks that saw no batch still take part: layers are agreed on first.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        world = torch.distributed.get_world_size()
        if world == 1:
            return self
        local = {
            "dims": {n: int(_sum_dim(s)) for n, s in self._sums.items()},
            "aliases": self.aliases,
            "dtype": str(next(iter(self._sums.values())).dtype) if self._sums else None,
        }
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, local)
        dims: dict[str, int] = {}
        aliases: dict[str, str] = {}
        for g in gathered:
            for n, d in g["dims"].items():
                if dims.setdefault(n, d) != d:
                    raise RuntimeError(f"ranks disagree on the input dimension of layer {n!r}: {dims[n]} vs {d}")
            for a, o in g["aliases"].items():
                if aliases.setdefault(a, o) != o:
                    raise RuntimeError(f"ranks disagree on which layer {a!r} shares its input with: {aliases[a]} vs {o}")
        dtype = next((getattr(torch, g["dtype"].split(".")[-1]) for g in gathered if g["dtype"]), torch.float64)
        device = _collective_device()
        names = list(dims)  # ordered union: rank 0's collection (model) order first, identical on every rank
        for n in names:  # every rank reduces the packed form (half the traffic), whatever form it held
            buf = self._sums.get(n)
            buf = torch.zeros(packed_length(dims[n]), dtype=dtype) if buf is None else buf
            buf = (pack_symmetric(buf) if buf.dim() == 2 else buf).to(device)
            torch.distributed.all_reduce(buf)
            self._sums[n] = buf.cpu()
        counts = torch.tensor([self.tokens.get(n, 0) for n in names], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(counts)
        self.tokens = {n: int(c) for n, c in zip(names, counts.tolist())}
        self._sums = {n: self._sums[n] for n in names}
        self.aliases = aliases
        self.metadata["world_size"] = world
        return self

    # ---------------------------------------------------------------- files
    def save(self, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> None:
        """Write a safetensors file, complete or not at all (`peft_ext.files.atomic_file`: a temporary beside `path`,
        fsynced and renamed into place, with the permissions a plain `open` would give; temporaries of interrupted
        writes are removed on failure and by the next write)."""
        from .files import atomic_file

        meta = {**self.metadata, **(metadata or {})}
        tensors = {}
        for n, s in self._sums.items():  # packed: a full (d, d) sum (built or edited by hand) keeps its upper triangle
            tensors[f"sum::{n}"] = (pack_symmetric(s) if s.dim() == 2 else s).contiguous()
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "block_size": str(BLOCK),
            "tokens": json.dumps({n: int(self.tokens[n]) for n in self._sums}),
            "aliases": json.dumps(self.aliases),
            "order": json.dumps(list(self._sums)),
            "metadata": json.dumps(meta, default=str),
        }
        path = os.fspath(path)
        _remove_old_temporaries(os.path.dirname(os.path.abspath(path)))
        with atomic_file(path) as tmp:
            save_file(tensors, tmp, metadata=header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ActivationStats":
        """Read a file written by `save`. Everything is checked before the statistics are returned: the format and
        its version, the header fields, a tensor for every layer, every token count, and each tensor's dtype, shape
        and values (finite, a non-negative diagonal). A problem raises one ValueError naming the file, the layer or
        field, the value and the fix."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no activation statistics file at {path!r}")
        redo = "recollect the statistics with ActivationStats.collect(...).save(path)"
        try:
            with safe_open(path, framework="pt") as f:
                header = f.metadata() or {}
                if header.get("format") != FORMAT:
                    raise ValueError(
                        f"{path!r} is not a peft_ext activation statistics file (format={header.get('format')!r}); "
                        "create one with ActivationStats.save"
                    )
                version = header.get("format_version")
                if version not in READABLE_VERSIONS:
                    raise ValueError(
                        f"{path!r} has format_version={version!r}, but this peft_ext reads format_version "
                        f"{' or '.join(map(repr, READABLE_VERSIONS))}: {redo} with this version of peft_ext (or use "
                        "the peft_ext that wrote it)"
                    )
                if version != "1" and header.get("block_size") != str(BLOCK):
                    raise ValueError(
                        f"{path!r} stores its sums in tiles of block_size={header.get('block_size')!r}, this peft_ext "
                        f"in tiles of {BLOCK}: {redo} with this version of peft_ext"
                    )
                fields = {}
                for key, kind in (("order", list), ("tokens", dict), ("aliases", dict), ("metadata", dict)):
                    raw = header.get(key, "{}" if key == "metadata" else None)
                    if raw is None:
                        raise ValueError(f"{path!r} has no {key!r} field in its header: the file is damaged; {redo}")
                    try:
                        fields[key] = json.loads(raw)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path!r}: header field {key!r} is not valid JSON ({e.msg}); {redo}") from None
                    if not isinstance(fields[key], kind):
                        raise ValueError(f"{path!r}: header field {key!r} holds a {type(fields[key]).__name__}, not "
                                         f"a JSON {'list' if kind is list else 'object'}; {redo}")
                order = fields["order"]
                stored = set(f.keys())
                sums = {}
                for n in order:
                    if not isinstance(n, str) or f"sum::{n}" not in stored:
                        raise ValueError(f"{path!r} lists layer {n!r} in its header but holds no tensor "
                                         f"'sum::{n}' for it: the file is damaged or was edited; {redo}")
                    sums[n] = f.get_tensor(f"sum::{n}")
                    if sums[n].dim() != (2 if version == "1" else 1):
                        raise ValueError(
                            f"{path!r}: layer {n!r} has a tensor of shape {tuple(sums[n].shape)}, but format_version "
                            f"{version} stores {'(d, d) matrices' if version == '1' else 'packed 1-D sums'}: "
                            f"the file is damaged or was edited; {redo}"
                        )
        except SafetensorError as e:
            # safe_open checks the header against the file's size, so a truncated file fails here, before any read
            raise ValueError(f"{path!r} is not a readable safetensors file ({e}): it is truncated or corrupt; "
                             f"{redo}") from None
        problem = _stats_problem(sums, fields["tokens"], fields["aliases"])
        if problem:
            raise ValueError(f"{path!r}: {problem}; the file is damaged or was edited: {redo}")
        return cls(sums, {n: c for n, c in fields["tokens"].items()}, fields["aliases"], fields["metadata"])

    def model_check(self, model: nn.Module, ignore_modules: Iterable[str] = ()) -> tuple[bool | None, str]:
        """Whether these statistics were collected on `model`: `(True, why)`, `(False, what differs)`, or
        `(None, why it cannot tell)` for statistics that record no fingerprint (built by hand with StatsRecorder,
        or written by an older peft_ext).

        Compares the config and one digest per weight tensor (see `model_fingerprint`), so the answer can name the
        tensors that differ. Tensors of modules named in `ignore_modules` (suffixes, matched as PEFT matches
        `modules_to_save`) are left out: an adapter trains its own copy of those, e.g. a task head initialised per
        seed, which no adapted layer reads.
        """
        stored_tensors = self.metadata.get("model_tensors")
        stored_config = self.metadata.get("model_config")
        whole = self.metadata.get("model_fingerprint") or (self.metadata.get("fingerprint") or {}).get("model")
        if not isinstance(stored_tensors, dict) or not isinstance(stored_config, dict):
            if not isinstance(whole, str):
                return None, "the statistics record no model fingerprint (made by hand or by an older peft_ext): not checked"
            if model_fingerprint(model) == whole:
                return True, "same config and weights (whole-model fingerprint)"
            return False, ("the model's config or weights differ (these statistics record one whole-model fingerprint, "
                           "so the differing tensors cannot be named)")
        whole_now, tensors, config = _fingerprint_parts(model)
        if whole_now == whole:
            return True, "same config and weights"
        ignore = [m for m in ignore_modules if isinstance(m, str)]
        skipped = {n for n in set(tensors) | set(stored_tensors) if _in_modules(n, ignore)}
        differ = sorted(n for n in set(tensors) & set(stored_tensors) - skipped if tensors[n] != stored_tensors[n])
        missing = sorted(set(stored_tensors) - set(tensors) - skipped)
        extra = sorted(set(tensors) - set(stored_tensors) - skipped)
        config_keys = sorted(k for k in set(config) | set(stored_config) if config.get(k) != stored_config.get(k))
        why = []
        if config_keys:
            k = config_keys[0]
            why.append(f"config differs in {len(config_keys)} key(s), e.g. {k}={stored_config.get(k)!r} in the "
                       f"statistics' model vs {config.get(k)!r} here")
        if differ:
            why.append(f"{len(differ)} of {len(tensors)} weight tensors differ, e.g. {differ[:3]}")
        if missing or extra:
            why.append(f"the tensor names differ ({len(missing)} only in the statistics' model, e.g. {missing[:2]}; "
                       f"{len(extra)} only here, e.g. {extra[:2]})")
        if not why:
            aside = sorted(n for n in skipped if tensors.get(n) != stored_tensors.get(n))
            return True, f"same config and weights except {aside[:4]} in modules_to_save (the adapter's own)"
        return False, "; ".join(why)

    # ---------------------------------------------------------------- collection
    @classmethod
    def collect(
        cls,
        model: nn.Module,
        dataloader: Iterable[Any],
        target_modules: Iterable[str] | None = None,
        *,
        dtype: torch.dtype = torch.float64,
        share_inputs: bool = True,
        max_batches: int | None = None,
        progress: bool = True,
        all_reduce: bool = True,
    ) -> "ActivationStats":
        """Run `model` over `dataloader` (eval mode, no grad) and return the statistics of the target layers.

        Batches are dicts of tensors (as a transformers collator gives; `labels` is dropped) or a tensor of
        input ids. The `attention_mask` of a batch, when present, excludes padding tokens. Under torch.distributed
        each process should get its own shard of the data; the sums are then all-reduced (`all_reduce=True`).
        """
        stats, _ = collect_stats(
            model, dataloader, target_modules, dtype=dtype, share_inputs=share_inputs, max_batches=max_batches,
            progress=progress, all_reduce=all_reduce,
        )
        return stats


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    dataloader: Iterable[Any],
    target_modules: Iterable[str] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    share_inputs: bool = True,
    heldout: Callable[[int], bool] | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    all_reduce: bool = True,
) -> tuple[ActivationStats, ActivationStats | None]:
    """One pass over `dataloader`; batch i goes to the held-out statistics when `heldout(i)` is true.

    Returns `(calibration, heldout)`; `heldout` is None when no batch was held out. A single pass matters: two
    passes over a shuffling DataLoader would draw different batches and the held-out set would overlap the
    calibration set.
    """
    # Restore each module's own mode afterwards: a PeftModel reports training=True while the model inside it may
    # be in eval mode, so model.train(was_training) would switch on dropout everywhere.
    modes = {m: m.training for m in model.modules()}
    model.eval()
    device = _input_device(model)
    total = None
    with contextlib.suppress(TypeError):
        total = len(dataloader)  # type: ignore[arg-type]
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    n_heldout = 0
    try:
        # bnb_cpu_repack_disabled: a forward without gradients must not repack (and round) a user's 4-bit weights
        with bnb_cpu_repack_disabled(model), \
                StatsRecorder(model, target_modules, dtype=dtype, share_inputs=share_inputs) as calib, \
                StatsRecorder(model, target_modules, dtype=dtype, share_inputs=share_inputs) as held:
            with progress_bar(dataloader, enabled=progress, total=total, desc="activation statistics",
                              unit="batch") as bar:
                for i, batch in enumerate(bar):
                    if max_batches is not None and i >= max_batches:
                        break
                    rec = held if heldout is not None and heldout(i) else calib
                    n_heldout += rec is held
                    inputs, mask = _model_inputs(batch, device)
                    with rec.batch(attention_mask=mask):
                        model(**inputs) if isinstance(inputs, dict) else model(inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode
    meta = _model_metadata(model)
    results = []
    for rec in (calib, held):
        stats = rec.result()
        stats.metadata.update(meta)
        if all_reduce:
            stats.all_reduce_()
        results.append(stats)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and all_reduce:
        counts = torch.tensor([n_heldout], device=_collective_device())
        torch.distributed.all_reduce(counts)
        n_heldout = int(counts.item())
    return results[0], (results[1] if n_heldout else None)


class StatsRecorder:
    """Hooks that accumulate input statistics while you run your own forward passes.

    ```python
    with StatsRecorder(model, ["query", "key", "value"]) as rec:
        for batch in loader:
            with rec.batch(attention_mask=batch["attention_mask"]):
                model(**batch)
    stats = rec.result()
    ```
    """

    def __init__(
        self,
        model: nn.Module,
        target_modules: Iterable[str] | None = None,
        *,
        dtype: torch.dtype = torch.float64,
        share_inputs: bool = True,
    ) -> None:
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
        self.targets = find_linear_targets(model, target_modules)
        self.dtype = dtype
        self.share_inputs = share_inputs
        self._names = {id(m): n for n, m in self.targets.items()}
        self._handles: list[Any] = []
        self.sums: dict[str, torch.Tensor] = {}  # packed (pack_symmetric), one per distinct input
        self.tokens: dict[str, int] = {}
        self._diagonal: dict[str, torch.Tensor] = {}  # where each packed sum keeps its diagonal
        self.aliases: dict[str, str] = {}
        self._batch_index = -1
        self._in_batch = False
        self._mask: torch.Tensor | None = None
        self._seen: dict[int, tuple[weakref.ref, str]] = {}  # id(input) -> (weak ref to it, owner) for this batch
        self._mask_warned: set[str] = set()

    def __enter__(self) -> "StatsRecorder":
        for module in self.targets.values():
            self._handles.append(module.register_forward_pre_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def batch(self, attention_mask: torch.Tensor | None = None):
        """Scope of one forward pass: tokens where `attention_mask` is 0 are skipped."""
        self._batch_index += 1
        # an all-ones mask selects every token: skip the copy that indexing with it would make
        self._mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        self._seen = {}
        self._in_batch = True
        try:
            yield self
        finally:
            self._in_batch = False
            self._mask = None
            self._seen = {}

    def result(self) -> ActivationStats:
        return ActivationStats(dict(self.sums), dict(self.tokens), dict(self.aliases), {"dtype": str(self.dtype)})

    # The hook runs once per target layer per forward pass.
    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._in_batch:  # forward passes outside `with recorder.batch(...)` are not recorded
            return
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        name = self._names[id(module)]
        hit = self._seen.get(id(x)) if self.share_inputs else None
        shared_with = hit[1] if hit is not None and hit[0]() is x else None
        if name in self.aliases:
            if shared_with != self.aliases[name]:
                raise RuntimeError(
                    f"layer {name!r} shared its input with {self.aliases[name]!r} on the first batch but not in batch "
                    f"{self._batch_index}; collect with share_inputs=False for this model"
                )
            return
        if shared_with is not None and name not in self.sums:
            self.aliases[name] = shared_with
            return
        xs = self._rows(x, name).to(self.dtype)
        d = xs.shape[1]
        acc = self.sums.get(name)
        if acc is None:
            acc = self.sums[name] = torch.zeros(packed_length(d), dtype=self.dtype, device=xs.device)
            self._diagonal[name] = packed_diagonal_index(d, xs.device)
            self.tokens[name] = 0
        add_gram_(acc, xs)  # only the tiles on and above the diagonal, straight into the sum
        # A NaN/Inf anywhere in a row shows up in its sum of squares on the diagonal, and the sums were finite
        # before this batch: checking d numbers names the batch as surely as checking every input (25x cheaper).
        if not all_finite(acc[self._diagonal[name]]):
            raise ValueError(
                f"non-finite (NaN/Inf) input to layer {name!r} in calibration batch {self._batch_index}; "
                "check the data of that batch and the model's dtype (fp16 overflow?)"
            )
        self.tokens[name] += xs.shape[0]
        if self.share_inputs:
            self._seen[id(x)] = (weakref.ref(x), name)

    def _rows(self, x: torch.Tensor, name: str) -> torch.Tensor:
        mask = self._mask
        if x.dim() >= 3 and mask is not None:
            if tuple(x.shape[:2]) == tuple(mask.shape):
                return x[mask.to(x.device)].reshape(-1, x.shape[-1])
            if name not in self._mask_warned:
                self._mask_warned.add(name)
                warnings.warn(
                    f"layer {name!r} gets input of shape {tuple(x.shape)}, which does not line up with the attention "
                    f"mask {tuple(mask.shape)}; counting all its positions (padding included)",
                    stacklevel=3,
                )
        return x.reshape(-1, x.shape[-1])


def _stats_problem(sums: Any, tokens: Any, aliases: Any) -> str | None:
    """The first thing that makes (sums, tokens, aliases) impossible as statistics of x x^T, in words; None if fine.

    Checked before anything reads them: a NaN sum would give a NaN covariance whose eigenvectors look like any
    others, and a negative count passes every later `== 0` test, so both must stop here, naming the layer.
    """
    for what, value in (("sums", sums), ("tokens", tokens), ("aliases", aliases)):
        if not isinstance(value, Mapping):
            return f"{what} must be a dict keyed by layer name, got a {type(value).__name__}"
    for name, s in sums.items():
        if not isinstance(s, torch.Tensor):
            return f"the sum for layer {name!r} is a {type(s).__name__}, not a tensor"
        if s.dtype not in (torch.float32, torch.float64):
            return f"the sum for layer {name!r} has dtype {s.dtype}; statistics are float32 or float64"
        if _sum_dim(s) is None:
            return (f"the sum for layer {name!r} has shape {tuple(s.shape)}, neither the (d, d) of a sum of x x^T "
                    "nor its packed form (1-D, packed_length(d) entries)")
        if name not in tokens:
            shown_names = sorted(map(str, tokens))[:4]
            return (f"the token table has no entry for layer {name!r} (it has {len(tokens)} entries, e.g. "
                    f"{shown_names})")
        count = tokens[name]
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            return f"the token count of layer {name!r} is {count!r}; a count is an integer >= 0"
        bad = nonfinite_count(s)
        if bad:
            return f"the sum for layer {name!r} holds {bad} non-finite (NaN/Inf) value(s) of {s.numel()}"
        if s.device.type != "meta":
            diag = _sum_diagonal(s)
            if bool((diag < 0).any()):
                return (f"the sum for layer {name!r} has a negative diagonal entry (a sum of squares), "
                        f"min {float(diag.min()):.3g}")
    for alias, owner in aliases.items():
        if owner not in sums:
            return f"alias {alias!r} points at {owner!r}, which has no statistics"
    return None


# mkstemp names of the stats writer before it went through files.atomic_file; they record no pid, so (as files.py
# does for such names) one is removed only once it is older than any single write could take.
_OLD_TEMPORARY = re.compile(r"\.stats-[A-Za-z0-9_]{8}\.safetensors")


def _remove_old_temporaries(directory: str) -> None:
    from .files import STALE_AFTER_S

    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if _OLD_TEMPORARY.fullmatch(name):
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - os.lstat(path).st_mtime > STALE_AFTER_S:
                        os.unlink(path)


def _in_modules(tensor_name: str, modules: Iterable[str]) -> bool:
    """Whether a tensor (canonical name) lives in a module named, or ending with, one of `modules` (PEFT's rule for
    modules_to_save), at any depth: 'classifier.dense.weight' is in 'classifier'."""
    parts = tensor_name.split(".")[:-1]
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p == m or p.endswith("." + m) for p in prefixes for m in modules)


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _input_device(model: nn.Module) -> torch.device:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        with contextlib.suppress(Exception):
            emb = get()
            if emb is not None and emb.weight.device.type != "meta":
                return emb.weight.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _model_inputs(batch: Any, device: torch.device) -> tuple[Any, torch.Tensor | None]:
    if isinstance(batch, Mapping):
        inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items() if k != "labels"}
        return inputs, inputs.get("attention_mask")
    if torch.is_tensor(batch):
        return batch.to(device), None
    raise TypeError(
        f"calibration batches must be dicts of tensors (as a transformers collator yields) or tensors of input ids, "
        f"got {type(batch).__name__}"
    )


def _model_metadata(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None and hasattr(model, "get_base_model"):
        cfg = getattr(model.get_base_model(), "config", None)
    whole, tensors, config = _fingerprint_parts(model)
    return {
        "model_name_or_path": getattr(cfg, "_name_or_path", "") if cfg is not None else "",
        "model_type": getattr(cfg, "model_type", "") if cfg is not None else "",
        # what the statistics were collected on, compared by ActivationStats.model_check before they are used
        "model_fingerprint": whole,
        "model_tensors": tensors,
        "model_config": config,
    }


# ---------------------------------------------------------------------------------------------------- caching

CACHE_SAMPLE = 1 << 16  # values hashed per large tensor by `model_fingerprint`
CACHE_FULL_HASH_MAX = 1 << 20  # tensors up to this many elements are hashed completely


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's config and weights, cheap enough for 7B models.

    Each parameter and buffer contributes its canonical name, shape and dtype, and its values: all of them up to
    2^20 elements, else 2^16 evenly spaced ones (a fine-tune or a merged adapter moves nearly every element, so the
    sample sees it; a change confined to a few unsampled elements would not be seen). Tensors on the meta device
    (weights offloaded by accelerate's `device_map`) are read from accelerate's offload map, so an offloaded model
    fingerprints like the same model in memory; without one they contribute the model's `_name_or_path` and
    `_commit_hash` instead of values. PEFT adapter weights and `modules_to_save` copies are skipped, and the
    original of a `modules_to_save` module counts under its own name, so a model fingerprints the same before and
    after `get_peft_model` (unless its initialisation rewrote base weights, as PiSSA and CorDA do).
    """
    return _fingerprint_parts(model)[0]


def _fingerprint_parts(model: nn.Module) -> tuple[str, dict[str, str], dict[str, Any]]:
    """(`model_fingerprint(model)`, {canonical tensor name: a digest of that tensor alone}, the config as hashed).

    The per-tensor digests and the config (JSON-normalised, as it reads back from a file) let
    `ActivationStats.model_check` say which tensors or config keys differ, not only that something does.
    """
    import hashlib

    from peft.tuners.tuners_utils import BaseTunerLayer

    skip: set[int] = set()
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            for attr in (*m.adapter_layer_names, *m.other_param_names):
                sub = getattr(m, attr, None)
                if isinstance(sub, nn.Module):
                    skip.update(id(t) for t in (*sub.parameters(), *sub.buffers()))
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is None and hasattr(model, "get_base_model"):
        cfg = getattr(model.get_base_model(), "config", None)
    config: dict[str, Any] = {}
    if cfg is not None and hasattr(cfg, "to_dict"):  # where the model was loaded from is not part of it
        described = {k: v for k, v in cfg.to_dict().items() if k not in ("_name_or_path", "_commit_hash")}
        text = json.dumps(described, sort_keys=True, default=str)
        h.update(text.encode())
        config = json.loads(text)
    modules = dict(model.named_modules())
    named = [*model.named_parameters(remove_duplicate=True), *model.named_buffers(remove_duplicate=True)]
    # PEFT's ModulesToSaveWrapper keeps the base module as `<name>.original_module`: it is the model's own tensor
    named = sorted(((canonical_name(n).replace(".original_module.", "."), n, t) for n, t in named
                    if id(t) not in skip and ".modules_to_save." not in n), key=lambda cnt: cnt[0])
    tensors: dict[str, str] = {}
    for name, raw_name, t in named:
        described_tensor = f"{name}|{tuple(t.shape)}|{t.dtype}|".encode()
        if t.device.type == "meta":
            t = _offloaded_value(modules, raw_name)
            if t is None:
                values = f"meta:{getattr(cfg, '_name_or_path', '')}@{getattr(cfg, '_commit_hash', '')}".encode()
                h.update(described_tensor + values)
                tensors[name] = hashlib.sha256(described_tensor + values).hexdigest()[:16]
                continue
        if type(t).__name__ == "DTensor":  # an FSDP2 shard: hash the whole tensor, as one process would (a
            t = t.full_tensor()            # collective: every rank walks the same sorted names)
        flat = t.detach().reshape(-1)
        if flat.numel() > CACHE_FULL_HASH_MAX:
            # integer positions: a float32 linspace rounds numel - 1 up to numel above 2**24 entries (an IndexError
            # on SmolLM2's 49152x576 embedding)
            n = flat.numel()
            flat = flat[torch.arange(CACHE_SAMPLE, device=flat.device, dtype=torch.int64) * (n - 1) // (CACHE_SAMPLE - 1)]
        flat = flat.cpu().contiguous().view(torch.uint8)
        if flat.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            flat = flat.clone()  # .numpy() of the model's own storage leaves it unresizable (FSDP2 frees by resizing)
        values = flat.numpy().tobytes()
        h.update(described_tensor + values)
        tensors[name] = hashlib.sha256(described_tensor + values).hexdigest()[:16]
    return h.hexdigest(), tensors, config


def _offloaded_value(modules: dict[str, nn.Module], raw_name: str) -> torch.Tensor | None:
    """The value accelerate keeps for an offloaded (meta) tensor in the `weights_map` of a hook on the tensor's module or
    one of its ancestors (cpu/disk offload with `device_map`); None when there is none."""
    parts = raw_name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        hook = getattr(modules.get(".".join(parts[:i])), "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            weights = getattr(h, "weights_map", None)
            if weights is not None:
                with contextlib.suppress(KeyError):
                    return weights[".".join(parts[i:])]
    return None


def data_fingerprint(dataloader: Iterable[Any], max_batches: int | None = None) -> str:
    """sha256 of the multiset of batches (every tensor but `labels`, by key): the statistics are sums, so the order
    of batches does not matter, and N processes that each hash their shard agree with one process hashing all of it
    (under torch.distributed the per-batch hashes of all ranks are gathered; every rank must call this)."""
    import hashlib

    per_batch = []
    for i, batch in enumerate(dataloader):
        if max_batches is not None and i >= max_batches:
            break
        h = hashlib.sha256()
        items = sorted(batch.items()) if isinstance(batch, Mapping) else [("input_ids", batch)]
        for key, value in items:
            if key == "labels" or not torch.is_tensor(value):
                continue
            value = value.detach().cpu().contiguous()
            h.update(f"{key}|{tuple(value.shape)}|{value.dtype}|".encode())
            h.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
        per_batch.append(h.hexdigest())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, per_batch)
        per_batch = [d for g in gathered for d in g]
    return hashlib.sha256("\n".join(sorted(per_batch)).encode()).hexdigest()


def cached_stats(
    path: str | os.PathLike,
    model: nn.Module,
    dataloader: Iterable[Any],
    target_modules: Iterable[str] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    share_inputs: bool = True,
    max_batches: int | None = None,
    progress: bool = True,
) -> ActivationStats:
    """`ActivationStats.collect(...)`, reusing the safetensors file at `path` when it was made from the same model,
    target layers, data and settings; otherwise collect, write `path` (atomically) and say why.

    The file's metadata keeps three fingerprints: `model_fingerprint(model)`, the canonical names of the target layers
    (with dtype and share_inputs) and `data_fingerprint(dataloader)` (token ids and masks of every batch, so re-pad or
    re-tokenise and it recomputes). `dataloader` is iterated twice: pass a list or a DataLoader, not a generator.
    The result's `metadata["cache"]` is `{"hit": bool, "reason": str, "path": str}`. Under torch.distributed every
    rank calls this with its own shard; rank 0 decides and writes, and `path` must be readable by every rank.
    """
    if iter(dataloader) is dataloader:
        raise TypeError("cached_stats iterates the data twice (fingerprint, then statistics): pass a list of batches "
                        "or a DataLoader, not a generator or iterator")
    path = os.fspath(path)
    layers = sorted(find_linear_targets(model, target_modules))
    wanted = {
        "model": model_fingerprint(model),
        "layers": json.dumps(layers),
        "settings": json.dumps({"dtype": str(dtype), "share_inputs": share_inputs}),
        "data": data_fingerprint(dataloader, max_batches),
    }
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    decision = [None]
    if rank == 0:
        decision[0] = _cache_verdict(path, wanted)
    if distributed:
        torch.distributed.broadcast_object_list(decision, src=0)
    hit, reason = decision[0]
    stats = None
    if hit:
        try:
            stats = ActivationStats.load(path)
        except ValueError as e:  # a damaged cache is recomputed, not an error: the data to recompute it is here
            hit, reason = False, f"the cached file is invalid ({e})"
    if stats is None:
        stats = ActivationStats.collect(model, dataloader, target_modules, dtype=dtype, share_inputs=share_inputs,
                                        max_batches=max_batches, progress=progress)
        if rank == 0:
            stats.save(path, metadata={"fingerprint": wanted})
        if distributed:
            torch.distributed.barrier()
        stats.metadata["fingerprint"] = wanted
    stats.metadata["cache"] = {"hit": hit, "reason": reason, "path": path}
    return stats


def _cache_verdict(path: str, wanted: dict[str, str]) -> tuple[bool, str]:
    if not os.path.isfile(path):
        return False, "no cached statistics yet"
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("metadata", "{}"))
            stored = meta.get("fingerprint") or {}
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file is simply recomputed
        return False, f"cache file unreadable ({type(e).__name__}: {e})"
    if not isinstance(meta.get("model_tensors"), dict):
        # without per-tensor digests initialize_nullspace_lora cannot tell a task head re-initialised per seed (which
        # it ignores as modules_to_save) from another model, and would refuse the statistics
        return False, "the cached file was written by an older peft_ext (no per-tensor model fingerprint)"
    why = []
    if stored.get("model") != wanted["model"]:
        why.append("the model's config or weights changed")
    if stored.get("layers") != wanted["layers"]:
        old, new = set(json.loads(stored.get("layers") or "[]")), set(json.loads(wanted["layers"]))
        why.append(f"the target layers changed (+{len(new - old)} -{len(old - new)}: e.g. "
                   f"{sorted(new - old)[:2] + sorted(old - new)[:2]})")
    if stored.get("settings") != wanted["settings"]:
        why.append(f"the settings changed ({stored.get('settings')} -> {wanted['settings']})")
    if stored.get("data") != wanted["data"]:
        why.append("the calibration data changed (token ids hash differs)")
    return (False, "; ".join(why)) if why else (True, "model, layers, data and settings match")
