"""Push and pull peft-ext adapters on the Hugging Face Hub, each with a model card for its kind.

    from peft_ext.hub import push_adapter, pull_adapter, render_card
    push_adapter("out/adapter", "me/bert-nullspace", report=report, calibration="2k tokens of Python docs")
    model = PeftModel.from_pretrained(base, "me/bert-nullspace", revision="<branch or sha>")  # no pull needed

Everything goes through `huggingface_hub` (so `HF_ENDPOINT`, `HF_TOKEN` and the cache settings apply). A push
validates the adapter folder (whole safetensors files, JSON, the config; no pickles, no links out of the folder)
before it touches the Hub and uploads every file in one commit, so the Hub never holds a half-written adapter; the
user's folder is never modified (the card is uploaded from memory). A pull checks the repo's file list, downloads one
commit into a temporary folder beside `local_dir`, validates it the same way and only then swaps it in, so
`local_dir` holds the previous copy or the new one, never a mix, whatever fails or kills the process.

Every request has a connect/read `timeout` (huggingface_hub 2.x sends its API calls without one, so a server that
accepts the connection and never answers would block forever); idempotent requests are retried with back-off
(`RETRY_WAITS`); what still fails raises `HubTransferError` (an OSError; `HubTimeoutError` is also a TimeoutError)
with one line naming the server, the request, what happened to the data and what to do.

What a push uploads from a folder: every file but hidden ones, the training state a `Trainer` writes next to the
adapter (`training_args.bin`, `optimizer.pt`, `scheduler.pt`, `rng_state*.pth`, `scaler.pt`, `trainer_state.json`,
`checkpoint-*/`, ...: skipped, with one warning naming them; see `TRAINER_FILES`), so `trainer.save_model(dir)` and
checkpoint folders push as they are. Any other pickle (`.bin`, `.pt`, `.pth`, `.pkl`, ...) is refused, including an
`adapter_model.bin` beside the safetensors weights (two copies of the weights that may differ: the user decides which
one is the adapter). Tokenizer and processor files (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`,
`tokenizer.model`, ...: JSON, text or protobuf, never pickle) are uploaded and pulled: the chat template and added
tokens a model was trained with belong with the adapter, as TRL's `SFTTrainer.push_to_hub` does.

The model card merges with the folder's own README.md (PEFT's or TRL's): its metadata (`pipeline_tag`, `tags`,
`model-index`, `datasets`, ...) and its text are kept, ours is added (method, configuration, calibration, report, the
peft-ext tags, training hyperparameters and framework versions) inside a marked block that the next push replaces.
PEFT's empty template text is dropped. The pushed `adapter_config.json` names the base by its Hub id (`base_model=`
or the recorded one), checked to exist on the server pushed to; a base recorded as a local path is refused unless
`base_model=` names it. The license is `license=`, else the folder's card's, else the base model's card's (on the
Hub, or a local base folder's README.md); when none says, a push is refused rather than guessing one.

Kinds of adapter and their cards (templates in `peft_ext/cards/`): `nullspace_lora`, `subspace_lora` (our PEFT types),
`lorax` (a LoRA written by the LoRA-X converter: it has a `lorax_report.json`), `lora_export` (a LoRA exported from a
peft-ext adapter: `export_to_lora` writes a `peft_ext_export.json` marker next to it) and `lora` (any other LoRA).
"""

from __future__ import annotations

import contextvars
import fnmatch
import importlib.metadata
import json
import math
import os
import re
import stat
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, Union

import httpx2  # huggingface_hub 2.x's HTTP client: its exceptions are what a timeout or a dropped connection raises
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    ModelCardData,
    hf_hub_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session, validate_repo_id

from .export import EXPORT_MARKER, read_export_marker
from .files import atomic_directory
from .nullspace.initialize import NullSpaceReport
from .registry import missing_type_hint

PathLike = Union[str, "os.PathLike[str]"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "README.md"
NULLSPACE_REPORT = "nullspace_report.json"
LORAX_REPORT = "lorax_report.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# A push replaces these as a set: one the new upload lacks is deleted on the Hub in the same commit, so a branch
# never mixes two adapters' files (say, an old lorax_report.json next to a NullSpaceLoRA adapter).
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, "adapter_model.bin", NULLSPACE_REPORT, LORAX_REPORT, EXPORT_MARKER)
# What a Trainer (and accelerate/DeepSpeed under it) writes beside the adapter that is not part of it: training state
# for resuming, mostly pickles. A push skips these (top level of the folder only) with one warning; transformers'
# own Trainer push ignores checkpoint-*/ the same way.
TRAINER_FILES = ("training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state.pth",
                 "rng_state_*.pth", "trainer_state.json", "pytorch_model_fsdp*.bin", "zero_to_fp32.py", "latest")
TRAINER_DIRS = ("checkpoint-*", "runs", "global_step*", "optimizer_*", "pytorch_model_fsdp_*")
# Tokenizer/processor files a Trainer or TRL saves with the adapter: none is a pickle, so they are uploaded and pulled
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model",
                   "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json")
PULL_PATTERNS = ["*.json", "*.safetensors", CARD_FILE, *TOKENIZER_FILES]  # never pickles
MAX_TABLE_ROWS = 64  # report tables longer than this are cut; the JSON in the repo has every layer
# Seconds to wait for the server to accept a connection, and then for each piece of its answer (httpx's connect/read/
# write/pool timeouts). Long enough for the Hub to process a large commit before it answers; a server that stops
# answering costs this many seconds per try instead of forever.
DEFAULT_TIMEOUT = 60.0
# Waits between tries of an idempotent request (repo/branch creation with exist_ok, reads, downloads): 4 tries in all.
# A commit is never retried: a lost answer would leave it unknown whether it landed (the error says how to check).
RETRY_WAITS = (1.0, 2.0, 4.0)
RETRY_STATUS = (429, 500, 502, 503, 504)  # busy or failing server: worth another try
# Hub license ids (huggingface.co/docs/hub/repositories-licenses) are lowercase: apache-2.0, cc-by-4.0, openrail++
# Our part of a model card, between these lines: the folder's own card is kept around it, and the next push (say, of a
# pulled copy) replaces the block instead of nesting a second one
CARD_BEGIN = "<!-- peft-ext card: begin (regenerated by every peft-ext push; edit outside this block) -->"
CARD_END = "<!-- peft-ext card: end -->"
# PEFT task type -> the Hub pipeline tag, set when the folder's card has none (PEFT does this for causal LMs)
TASK_TO_PIPELINE = {"CAUSAL_LM": "text-generation", "SEQ_2_SEQ_LM": "text2text-generation",
                    "SEQ_CLS": "text-classification", "TOKEN_CLS": "token-classification",
                    "QUESTION_ANS": "question-answering", "FEATURE_EXTRACTION": "feature-extraction"}
LICENSE_RE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
# bits per element of each safetensors dtype, to check every tensor's byte span against its shape
SAFETENSORS_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
                    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
                    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
MAX_SAFETENSORS_HEADER = 100_000_000  # the limit safetensors itself enforces


@dataclass(frozen=True)
class CardKind:
    """How to describe one kind of adapter: its template in peft_ext/cards/, Hub tags and the config fields shown."""

    template: str
    title: str
    tags: tuple[str, ...]
    fields: tuple[str, ...]


_LORA_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "lora_dropout", "bias", "use_rslora", "use_dora",
                "fan_in_fan_out", "modules_to_save", "layers_to_transform", "task_type")
# One line per kind (plus its template). A kind named like a PEFT type in lower case is found from the peft_type of
# adapter_config.json; LoRA-typed kinds are told apart by the files next to the adapter (see adapter_kind).
CARD_KINDS: dict[str, CardKind] = {
    "nullspace_lora": CardKind("nullspace_lora.md", "NullSpaceLoRA", ("nullspace-lora",),
                               ("r", "mode", "nullspace_alpha", "nullspace_dropout", "bias", "fan_in_fan_out",
                                "modules_to_save", "layers_to_transform", "task_type")),
    "subspace_lora": CardKind("subspace_lora.md", "SubspaceLoRA", ("subspace-lora",),
                              ("k", "core", "train_residual", "exact_max_dim", "niter", "seed", "modules_to_save",
                               "layers_to_transform", "task_type")),
    "ortho_split": CardKind("ortho_split.md", "OrthoSplit", ("orthosplit",),
                            ("base_kind", "density", "selector", "contrastive_lambda", "layout", "values_dtype",
                             "train_ortho", "uses_reference", "seed", "modules_to_save", "layers_to_transform",
                             "task_type")),
    "lora_export": CardKind("lora_export.md", "LoRA exported by peft-ext", ("lora",), _LORA_FIELDS),
    "lorax": CardKind("lorax.md", "LoRA-X transferred LoRA", ("lora", "lora-x"), _LORA_FIELDS),
    "lora": CardKind("lora.md", "LoRA", ("lora",), _LORA_FIELDS),
}

# PEFT task type -> the transformers class the load snippet uses (when adapter_config.json names no base class)
TASK_TO_AUTO_CLASS = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}

NULLSPACE_LAYER_KEYS = ("layer", "in_features", "r", "tokens", "eig_ratio", "tail_energy", "heldout_ratio",
                        "init_output_ratio", "flags")
NULLSPACE_NUMBERS = ("eig_ratio", "tail_energy", "heldout_ratio", "init_output_ratio")  # formatted with :e in the card
LORAX_LAYER_KEYS = ("name", "shape", "phi_u", "phi_v", "energy_kept", "rank", "action")
LORAX_NUMBERS = ("phi_u", "phi_v", "energy_kept")
LORAX_SUMMARY_KEYS = ("layers", "transferred", "dropped", "copied", "mean_phi_u", "mean_phi_v", "energy_kept")
LORAX_SUMMARY_NUMBERS = ("energy_kept", "mean_phi_u", "mean_phi_v")


# ------------------------------------------------------------------------------------------------ adapter folders


def read_adapter_config(adapter: PathLike, *, revision: str | None = None, token: str | None = None,
                        field: str = "adapter") -> dict[str, Any]:
    """adapter_config.json of a local adapter folder or a Hub repo id, validated: UTF-8 JSON, an object, with a
    `peft_type` string. Every error names the folder or repo (as `field`), the file and the fix.

    The one reader of adapter configs in peft-ext (the CLI, the Hub cards and LoRA-X use it). A Hub id is read
    through huggingface_hub (HF_ENDPOINT, HF_TOKEN, the cache and HF_HUB_OFFLINE apply), at `revision`.
    """
    name = os.fspath(adapter) if isinstance(adapter, (str, os.PathLike)) else adapter
    if not isinstance(name, str):
        raise TypeError(f"{field}={adapter!r} must be an adapter folder or a Hub repo id (str or os.PathLike)")
    folder = Path(name)
    if folder.is_dir():
        path = folder / CONFIG_FILE
        if not path.is_file():
            raise ValueError(f"{field}={name!r} has no {CONFIG_FILE}, so it is not a PEFT adapter folder; write one "
                             "with model.save_pretrained(folder) on a PeftModel")
        return _read_config(path, "re-save the adapter with model.save_pretrained(folder)")
    if folder.exists():
        raise ValueError(f"{field}={name!r} is a file; pass the directory that holds it (or a Hub repo id)")
    if not _is_repo_id(name):
        raise FileNotFoundError(f"{field}={name!r}: no such directory (and not a Hub repo id); check the path")
    from huggingface_hub import constants

    try:
        path = hf_hub_download(name, CONFIG_FILE, revision=revision, token=token)
    except LocalEntryNotFoundError as e:  # offline, or the Hub unreachable, and nothing cached
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} could not be reached"
        raise FileNotFoundError(f"{field}={name!r} is not a local directory, and it is not in the Hub cache ({why}); "
                                "pass a local directory, or unset HF_HUB_OFFLINE and check the network") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {name!r} has no revision {revision!r}; check the branch, tag or commit "
                                "sha") from e
    except RepositoryNotFoundError as e:  # also what the Hub answers for a private repo without a token
        raise FileNotFoundError(f"{field}={name!r} is not a local directory, and {constants.ENDPOINT} has no repo "
                                f"{name!r} that you can see; check the path or repo id, and if the repo is private "
                                "or gated log in with `hf auth login` (or set HF_TOKEN)") from e
    except EntryNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {name!r} has no {CONFIG_FILE}, so it is not a PEFT adapter repo; check "
                                "the repo id") from e
    return _read_config(Path(path), f"ask the owner of {name!r} to push the adapter again (model.push_to_hub)",
                        f"Hub repo {name!r}: {CONFIG_FILE}")


def _read_config(path: Path, fix: str, label: str | None = None) -> dict[str, Any]:
    label = label or str(path)
    config = _read_json(path, fix, label)
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        found = config.get("peft_type") if isinstance(config, dict) else config
        raise ValueError(f"{label} has peft_type={found!r}, expected a PEFT type name such as 'LORA'; {fix}")
    return config


def _read_json(path: Path, fix: str, label: str | None = None) -> Any:
    label = label or str(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{label} is not UTF-8 text ({e}); {fix}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{label} is not valid JSON ({e}); {fix}") from e


def adapter_kind(adapter_dir: PathLike) -> str:
    """Which card an adapter folder gets: its PEFT type, and for LoRAs the report or marker beside it."""
    peft_type = _local_config(adapter_dir)["peft_type"]
    folder = Path(adapter_dir)
    if peft_type == "LORA":
        if (folder / LORAX_REPORT).is_file():
            return "lorax"
        return "lora_export" if (folder / EXPORT_MARKER).is_file() else "lora"
    if peft_type.lower() in CARD_KINDS:
        return peft_type.lower()
    raise ValueError(f"{CONFIG_FILE} has peft_type={peft_type!r}, for which peft-ext has no model card (kinds: "
                     f"{', '.join(CARD_KINDS)}); upload it with huggingface_hub.upload_folder, or add a template to "
                     "peft_ext/cards/ and a line to peft_ext.hub.CARD_KINDS")


def validate_adapter_dir(adapter_dir: PathLike) -> list[str]:
    """Check that a folder is a loadable, pickle-free PEFT adapter; return the files to upload (POSIX, relative).

    Runs before anything touches the Hub, so a refused push leaves no repo and no commit behind. Checked: the config
    parses and loads as its PEFT type; `adapter_model.safetensors` exists; every `.safetensors` file is whole (each
    tensor's bytes against its dtype and shape, the file's size against the header) and every `.json` parses; no
    pickles; no link leads out of the folder and nothing is a pipe or device (see `_adapter_files`).
    """
    return list(_checked_adapter_files(adapter_dir))


def _checked_adapter_files(adapter_dir: PathLike) -> dict[str, Path]:
    """validate_adapter_dir, returning for each file the path to read (a link's validated target)."""
    return _checked_and_skipped(adapter_dir)[0]


def _checked_and_skipped(adapter_dir: PathLike) -> tuple[dict[str, Path], list[str]]:
    """The validated files to upload, and the Trainer files left out (see TRAINER_FILES)."""
    _local_config(adapter_dir)  # the plain "not an adapter folder" errors first
    where = f"adapter_dir={str(adapter_dir)!r}"
    skipped: list[str] = []
    files = _adapter_files(Path(adapter_dir), where, skipped)
    _validate_adapter_files(Path(adapter_dir), files, where, lambda name: str(Path(adapter_dir) / name),
                            "re-save the adapter with model.save_pretrained(folder)")
    return files, skipped


def _local_config(adapter_dir: Any) -> dict[str, Any]:
    """read_adapter_config for what must be a local folder (a push, a card): a repo id is not looked up."""
    shown = os.fspath(adapter_dir) if isinstance(adapter_dir, (str, os.PathLike)) else adapter_dir
    if not isinstance(shown, str) or not Path(shown).is_dir():
        raise ValueError(f"adapter_dir={shown!r} is not a directory; pass the folder written by "
                         "model.save_pretrained(folder) or trainer.save_model(folder)")
    return read_adapter_config(shown, field="adapter_dir")


def _is_trainer_file(name: str, is_dir: bool) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in (TRAINER_DIRS if is_dir else TRAINER_FILES))


def _adapter_files(folder: Path, where: str, skipped: list[str] | None = None) -> dict[str, Path]:
    """Every non-hidden file under `folder` that a push uploads: relative POSIX name -> the path to read.

    At the top of the folder, what a Trainer writes beside the adapter (TRAINER_FILES, TRAINER_DIRS) is left out and
    listed in `skipped` (directories with a trailing "/"), before any other check: it is never read.

    A link is followed only to a regular file inside the folder (a link to a token or a private file elsewhere would
    be uploaded otherwise), or, for a snapshot folder of the huggingface_hub cache (what `pull_adapter()` returns),
    into that cache repo's `blobs/` where its files really live. Links to directories are refused rather than
    followed (they can lead anywhere, or loop); pipes, sockets and devices are refused (opening a pipe for the upload
    would block forever). Hidden entries (`.cache/`, `.git/`, `.env`) are never uploaded, links or not.
    """
    root = Path(os.path.realpath(folder))
    snapshots = root.parent
    blobs = snapshots.parent / "blobs" if snapshots.name == "snapshots" and "--" in snapshots.parent.name else None
    found: dict[str, Path] = {}

    def refuse_walk_error(error: OSError) -> None:
        raise ValueError(f"{where}: cannot read {error.filename!r} ({error.strerror}); fix its permissions") from error

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=refuse_walk_error):
        here = Path(dirpath)
        top = here == root
        for name in list(dirnames):
            if name.startswith("."):
                dirnames.remove(name)
            elif top and skipped is not None and _is_trainer_file(name, is_dir=True):
                dirnames.remove(name)
                skipped.append(name + "/")
            elif (here / name).is_symlink():
                rel = (here / name).relative_to(root).as_posix()
                raise ValueError(f"{where}: {rel!r} is a link to a directory ({os.readlink(here / name)}); peft-ext "
                                 "does not follow directory links (they can lead out of the folder or loop): replace "
                                 "it with a real folder holding the files, or remove it")
        for name in filenames:
            if name.startswith("."):
                continue
            if top and skipped is not None and _is_trainer_file(name, is_dir=False):
                skipped.append(name)
                continue
            path = here / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                target = Path(os.path.realpath(path))
                if not target.exists():
                    raise ValueError(f"{where}: {rel!r} is a link to {os.readlink(path)!r}, which does not exist; "
                                     "remove the link or copy the file in")
                inside = target.is_relative_to(root) or (blobs is not None and target.is_relative_to(blobs))
                if not inside:
                    raise ValueError(f"{where}: {rel!r} is a link to {str(target)!r}, outside the folder; a push never "
                                     "uploads what a link points to outside the adapter folder (it could be a token "
                                     "or a private file): copy the file in if it belongs to the adapter, or remove "
                                     "the link")
                if target.is_relative_to(root) and any(p.startswith(".") for p in target.relative_to(root).parts):
                    raise ValueError(f"{where}: {rel!r} is a link to the hidden {target.relative_to(root).as_posix()!r}"
                                     "; hidden files are never uploaded, under their name or another: copy the file "
                                     "in under a plain name if it belongs to the adapter, or remove the link")
                path = target
            if not stat.S_ISREG(path.stat().st_mode):
                raise ValueError(f"{where}: {rel!r} is not a regular file (a pipe, socket or device); remove it")
            found[rel] = path
    return dict(sorted(found.items()))


def _validate_adapter_files(folder: Path, files: dict[str, Path], where: str, label: Callable[[str], str],
                            fix: str) -> None:
    """The checks a complete, safe adapter passes: shared by push (a local folder) and pull (a downloaded commit)."""
    pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    if "adapter_model.bin" in pickles and WEIGHTS_FILE in files:
        raise ValueError(
            f"{where} holds adapter_model.bin next to {WEIGHTS_FILE}: two copies of the adapter weights that may "
            f"differ (PEFT loads {WEIGHTS_FILE}), and the .bin is a pickle, which peft-ext never uploads (loading a "
            "pickle can run arbitrary code). Delete adapter_model.bin if the safetensors file is the adapter, or "
            "re-save it with model.save_pretrained(folder, safe_serialization=True)"
        )
    if pickles:
        raise ValueError(
            f"{where} holds pickle files {pickles}: loading a pickle can run arbitrary code, so peft-ext does not "
            "upload them. Save the adapter with model.save_pretrained(folder, safe_serialization=True) (the default) "
            f"to get {WEIGHTS_FILE}, and remove {pickles[0]!r}"
        )
    if WEIGHTS_FILE not in files:
        raise ValueError(f"{where} has no {WEIGHTS_FILE}; save the adapter with model.save_pretrained(folder, "
                         "safe_serialization=True) (the default)")
    for name, path in files.items():
        if name.endswith(".safetensors"):
            _check_safetensors(path, label(name), fix)
        elif name.endswith(".json"):
            _read_json(path, fix, label(name))
    config = _read_config(files[CONFIG_FILE], fix, label(CONFIG_FILE))
    _check_loadable(config, folder, label(CONFIG_FILE), fix)


def _check_safetensors(path: Path, label: str, fix: str) -> None:
    """Check the whole file against its header: every tensor's byte span matches its dtype and shape, the spans
    tile the data section without holes or overlaps, and the file is exactly as long as they say. This is what
    safetensors itself checks on load, done before an upload (a header-only check passes a file cut short in its
    tensor data, which then fails for whoever downloads it)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= MAX_SAFETENSORS_HEADER:
            raise ValueError(f"{label} is not a safetensors file (header length {n}); {fix}")
        if n > size - 8:
            raise ValueError(f"{label} is truncated inside its header ({size} bytes, the header alone needs "
                             f"{n + 8}); {fix}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{label} has a corrupt safetensors header ({e}); {fix}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{label} has a corrupt safetensors header (a {type(header).__name__}, not an object); {fix}")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, offsets = (info.get(k) for k in ("dtype", "shape", "data_offsets")) if isinstance(
            info, dict) else (None, None, None)
        ints = lambda v: isinstance(v, list) and all(type(x) is int and x >= 0 for x in v)  # noqa: E731
        if dtype not in SAFETENSORS_BITS or not ints(shape) or not ints(offsets) or len(offsets) != 2 or \
                offsets[0] > offsets[1]:
            raise ValueError(f"{label}: tensor {name!r} has a corrupt header entry {info!r}; {fix}")
        bits = math.prod(shape) * SAFETENSORS_BITS[dtype]
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            raise ValueError(f"{label}: tensor {name!r} ({dtype}, shape {shape}) needs {bits / 8:g} bytes but its "
                             f"offsets span {offsets[1] - offsets[0]}; {fix}")
        spans.append((offsets[0], offsets[1], name))
    if not spans:
        raise ValueError(f"{label} holds no tensors; {fix}")
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise ValueError(f"{label}: tensor {name!r} starts at data byte {begin} but the tensor before it ends at "
                             f"{end} (a hole or an overlap); {fix}")
        end = stop
    data = size - 8 - n
    if end > data:
        raise ValueError(f"{label} is truncated: its tensors need {end} bytes of data but the file holds {data} "
                         f"({end - data} bytes short); {fix}")
    if end < data:
        raise ValueError(f"{label} has {data - end} bytes after the last tensor, which no safetensors writer leaves; "
                         f"{fix}")


def _check_loadable(config: dict[str, Any], folder: Path, label: str, fix: str) -> None:
    """The PEFT type must be known to this process (ours are registered by importing peft_ext) and parse."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils.peft_types import PeftType

    peft_type = config["peft_type"]
    member = PeftType.__members__.get(peft_type)
    if member is None or member not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(f"{label} has peft_type={peft_type!r}, which PEFT cannot load in this process; "
                         + (missing_type_hint(peft_type) or "check the peft version the adapter was saved with"))
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[member]
    try:
        config_cls.from_pretrained(str(folder))
    except Exception as e:  # PEFT raises TypeError/ValueError from the dataclass and its __post_init__
        raise ValueError(f"{label} does not load as {config_cls.__name__}: {_one_line(e)}; fix the field it names, "
                         f"or {fix}") from e


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else type(error).__name__


# ------------------------------------------------------------------------------------------------ model cards


def render_card(
    adapter_dir: PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    calibration: str | None = None,
    extra_tags: Iterable[str] = (),
    kind: str | None = None,
    report: NullSpaceReport | PathLike | dict[str, Any] | None = None,
    training_args: Any = None,
) -> ModelCard:
    """The model card (README.md) for an adapter folder: the `peft_ext/cards/` template of its kind, merged with the
    folder's own README.md (PEFT's or TRL's card) when it has one.

    `base_model` names the base on the Hub; by default it is the adapter's `base_model_name_or_path` (for LoRA-X,
    the report's `target_base`) when that is a Hub id; a local path is left out of the metadata (with a warning;
    `push_adapter` refuses it instead). `license`: by default the folder card's, else the license in the README.md of
    a local base folder the adapter records; when none is known this raises (`push_adapter` also reads the base's
    card on the Hub). `report` is a NullSpaceLoRA verification report (object, JSON path or dict); without it the
    folder's `nullspace_report.json` is used if present. `training_args` (a `transformers.TrainingArguments`, or a
    dict of name -> value) adds the training hyperparameters; without it they come from the folder's
    `trainer_state.json` when a Trainer checkpoint has one. The merge keeps the folder card's metadata and text and
    puts ours in a block marked by CARD_BEGIN/CARD_END (see the module docstring).
    """
    return _render_card(adapter_dir, repo_id=repo_id, base_model=base_model, license=license,
                        calibration=calibration, extra_tags=extra_tags, kind=kind, report=report,
                        training_args=training_args)[0]


def _render_card(adapter_dir: PathLike, *, repo_id: str | None, base_model: str | None, license: str | None,
                 calibration: str | None, extra_tags: Iterable[str], kind: str | None,
                 report: NullSpaceReport | PathLike | dict[str, Any] | None, training_args: Any,
                 base_card: dict[str, Any] | None = None, require_base: bool = False) -> tuple[ModelCard, str | None]:
    """render_card, also returning the base's Hub id. `base_card`: the base model's card metadata as read from the
    Hub by push_adapter (for its license); `require_base`: refuse a base known only as a local path (a push)."""
    config = _local_config(adapter_dir)
    folder = Path(adapter_dir)
    kind = _check_kind(kind if kind is not None else adapter_kind(adapter_dir))
    spec = CARD_KINDS[kind]
    if repo_id is not None:
        _check_repo_id(repo_id)
    if license is not None:
        _check_license(license)
    extra_tags = _check_tags(extra_tags)
    if calibration is not None and not isinstance(calibration, str):
        raise TypeError(f"calibration={calibration!r} must be a string (one line on the calibration data, shown in "
                        "the card) or None")
    if report is not None and kind != "nullspace_lora":
        raise ValueError(f"report= is a NullSpaceLoRA verification report, but this adapter is a {kind!r}; drop it")
    hyperparameters = _hyperparameters(training_args, folder)
    lorax = _lorax_report(folder) if kind == "lorax" else None
    recorded = lorax["target_base"] if lorax else config.get("base_model_name_or_path")
    hub_base = _base_model_id(base_model, recorded, require=require_base)
    own = _folder_card(folder)

    shown_base = f"`{hub_base}`" if hub_base else "a local base model (not named on the Hub)"
    repo = repo_id or "<namespace>/<adapter>"
    body, fw_present, has_hyperparameters = _foreign_body(own)
    framework = [line for line in _framework_lines(config) if not _listed(line, fw_present)]
    variables: dict[str, Any] = {
        "title": spec.title,
        "repo_id": repo,
        "repo_name": repo.split("/")[-1],
        "base_model": shown_base,
        "base_model_id": hub_base,
        "base_model_arg": json.dumps(hub_base) if hub_base else '"<base model>"',
        "base_class": _base_class(config),
        "config_table": _config_table(config, spec, shown_base),
        "calibration": calibration,
        "report_table": None,
        "report_summary": None,
        # what the folder's card already says is not said twice (the merge below adds to its sections instead)
        "training_hyperparameters": None if has_hyperparameters or "## Training procedure" in body.splitlines()
        else _hyperparameter_lines(hyperparameters),
        "framework_versions": None if fw_present is not None else "\n".join(framework),
    }
    if kind == "nullspace_lora":
        variables.update(_nullspace_variables(_nullspace_report(folder, report), config))
    elif kind == "lorax":
        variables.update(_lorax_variables(lorax))
    elif kind == "lora_export":
        variables["export_source"] = _export_source(folder)
    with resources.as_file(template_path(spec.template)) as path:
        ours = ModelCard.from_template(ModelCardData(), template_path=str(path), **variables)
    ours_text = ours.text.strip("\n")
    if body.strip():  # the folder's card leads (its title and text); ours follows as one section
        lines = ours_text.splitlines()
        if lines and lines[0].startswith("# "):
            lines[0] = f"## About this adapter: {spec.title} (peft-ext)"
        ours_text = "\n".join(lines)
        body = _add_to_sections(body, framework if fw_present is not None else [],
                                None if has_hyperparameters else _hyperparameter_lines(hyperparameters))
    merged = (body.rstrip() + "\n\n" if body.strip() else "") + f"{CARD_BEGIN}\n{ours_text}\n{CARD_END}\n"
    licensing = _license(license, own, base_card, recorded)  # last: every input error is said first
    data = _merged_metadata(own.data if own is not None else ModelCardData(), spec, hub_base, licensing, config,
                            extra_tags)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{merged}"), hub_base


def _folder_card(folder: Path) -> ModelCard | None:
    """The folder's own README.md (what PEFT's save_pretrained or TRL wrote, perhaps edited), parsed."""
    path = folder / CARD_FILE
    if not path.is_file():
        return None
    fix = "fix it, or move README.md out of the folder (its text and metadata are merged into the pushed card)"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); {fix}") from e
    if not text.startswith("---"):
        text = "---\n---\n" + text  # no metadata block: huggingface_hub would log that it found none
    try:
        return ModelCard(text)
    except Exception as e:  # noqa: BLE001 - yaml's errors or huggingface_hub's ValueError: the block does not parse
        raise ValueError(f"{path}: its YAML metadata block does not parse ({_one_line(e)}); {fix}") from e


def _foreign_body(own: ModelCard | None) -> tuple[str, list[str] | None, bool]:
    """The folder card's text without our previous block and without PEFT's empty template: (text, the lines of its
    "### Framework versions" section or None when it has none, whether it lists training hyperparameters)."""
    if own is None:
        return "", None, False
    text = own.text
    begin, end = text.find(CARD_BEGIN), text.find(CARD_END)
    if begin != -1 and end > begin:  # our block from an earlier push (a pulled copy pushed again): replaced
        text = text[:begin] + text[end + len(CARD_END):]
    lines = text.splitlines()
    fw = _section(lines, "### Framework versions")
    without_fw = lines[:fw[0]] + lines[fw[1]:] if fw else lines
    if _squash("\n".join(without_fw)) == _squash(ModelCard.from_template(ModelCardData()).text):
        return "", None, False  # PEFT's save_pretrained card: huggingface_hub's empty template + "- PEFT x.y"
    fw_lines = lines[fw[0] + 1:fw[1]] if fw else None
    return text.strip("\n"), fw_lines, _section(lines, "### Training hyperparameters") is not None


def _squash(text: str) -> str:
    return " ".join(text.split())


def _section(lines: list[str], heading: str) -> tuple[int, int] | None:
    """[start, end) of the markdown section under `heading` (a line of its own, outside code blocks): up to the next
    heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    start, fenced = None, False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        if start is None:
            if line.strip() == heading:
                start = i
        elif line.startswith("#") and len(line) - len(line.lstrip("#")) <= level and \
                line[len(line) - len(line.lstrip("#")):].startswith(" "):
            return start, i
    return (start, len(lines)) if start is not None else None


def _add_to_sections(body: str, framework: list[str], hyperparameters: str | None) -> str:
    """Our framework version lines into the folder card's "### Framework versions" list, and our hyperparameters
    into its "## Training procedure" (before its framework versions), as PEFT adds its version to a card."""
    lines = body.splitlines()
    fw = _section(lines, "### Framework versions")
    if fw and framework:
        at = fw[1]
        while at > fw[0] + 1 and not lines[at - 1].strip():
            at -= 1
        lines[at:at] = framework
    procedure = _section(lines, "## Training procedure")
    if procedure and hyperparameters:
        fw = _section(lines, "### Framework versions")
        at = fw[0] if fw and procedure[0] < fw[0] < procedure[1] else procedure[1]
        lines[at:at] = ["### Training hyperparameters", "", *hyperparameters.splitlines(), ""]
    return "\n".join(lines)


def _listed(line: str, present: list[str] | None) -> bool:
    """Whether a framework line ("- PEFT 0.21.2") names a library the card's list already has ("- PEFT 0.21.2",
    "- PEFT: 0.21.2")."""
    name = line[2:].split(" ")[0].lower()
    return any(re.match(rf"-\s*{re.escape(name)}(:|\s)", p.strip().lower()) for p in present or [])


def _framework_lines(config: dict[str, Any]) -> list[str]:
    """What is known of the versions: the PEFT that saved the adapter (adapter_config.json's peft_version) and the
    peft-ext that wrote this card."""
    lines = []
    if isinstance(config.get("peft_version"), str) and config["peft_version"].strip():
        lines.append(f"- PEFT {config['peft_version'].strip()}")
    try:
        version = importlib.metadata.version("peft-ext")
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version:
        lines.append(f"- peft-ext {version}")
    return lines


def _hyperparameters(training_args: Any, folder: Path) -> dict[str, Any]:
    """Training hyperparameters as transformers' Trainer cards list them: from `training_args`, else from a Trainer
    checkpoint's trainer_state.json (never from training_args.bin: a pickle, never opened)."""
    if training_args is not None:
        if isinstance(training_args, dict):
            if not all(isinstance(k, str) for k in training_args):
                raise TypeError(f"training_args={training_args!r} must map hyperparameter names (str) to values")
            return dict(training_args)
        from transformers import TrainingArguments
        from transformers.modelcard import extract_hyperparameters_from_trainer

        if not isinstance(training_args, TrainingArguments):
            raise TypeError(f"training_args must be a transformers.TrainingArguments (trainer.args) or a dict of "
                            f"hyperparameters, got {type(training_args).__name__}")
        # the function transformers' own card uses; it reads trainer.args only
        return extract_hyperparameters_from_trainer(type("T", (), {"args": training_args})())
    path = folder / "trainer_state.json"
    try:
        state = json.loads(path.read_bytes().decode("utf-8")) if path.is_file() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        state = None  # training state, not part of the adapter (never uploaded): the card just does without it
    if not isinstance(state, dict):
        return {}
    found = {"train_batch_size": state.get("train_batch_size"),
             "training_steps": state.get("max_steps") if (state.get("max_steps") or 0) > 0 else None,
             "num_epochs": state.get("num_train_epochs"), "steps_done": state.get("global_step")}
    return {k: v for k, v in found.items() if _is_number(v)}


def _hyperparameter_lines(hyperparameters: dict[str, Any]) -> str | None:
    if not hyperparameters:
        return None
    return "The following hyperparameters were used during training:\n" + "\n".join(
        f"- {k}: {_round(v)}" for k, v in hyperparameters.items())


def _round(value: Any) -> Any:
    return f"{value:.4g}" if isinstance(value, float) else getattr(value, "value", value)


def _license(explicit: str | None, own: ModelCard | None, base_card: dict[str, Any] | None,
             recorded: Any) -> dict[str, str]:
    """{license, license_name?, license_link?}: `license=`, else the folder card's, else the base model's card's
    (read from the Hub by push_adapter, or the README.md of a local base folder); else refused."""
    if explicit is not None:
        return {"license": explicit}
    candidates = []
    if own is not None:
        candidates.append(("the adapter folder's README.md", own.data.to_dict()))
    if base_card is not None:
        candidates.append(("the base model's card on the Hub", base_card))
    if isinstance(recorded, str) and recorded and os.path.isfile(os.path.join(recorded, CARD_FILE)):
        try:
            local = ModelCard.load(os.path.join(recorded, CARD_FILE), ignore_metadata_errors=True).data.to_dict()
        except Exception:  # noqa: BLE001 - a base card we cannot read says nothing about the license
            local = {}
        candidates.append((f"{recorded}/README.md", local))
    for _, meta in candidates:
        value = meta.get("license")
        if isinstance(value, str) and LICENSE_RE.match(value):
            found = {"license": value}
            if value == "other":  # the Hub's way to name a custom license (llama3, gemma, ...): keep its name/link
                found.update({k: meta[k] for k in ("license_name", "license_link") if isinstance(meta.get(k), str)})
            return found
    looked = ", ".join(name for name, _ in candidates) or "no card (the base is not known on the Hub)"
    raise ValueError(f"license=None and no license is known (looked at: {looked}); pass license= (--license) with "
                     "the adapter's license, usually the base model's, e.g. 'apache-2.0', 'mit' or 'other'")


def _merged_metadata(data: ModelCardData, spec: CardKind, hub_base: str | None, licensing: dict[str, str],
                     config: dict[str, Any], extra_tags: list[str]) -> ModelCardData:
    """The folder card's metadata (pipeline_tag, tags, datasets, model-index, ...) with ours set on top: library_name
    peft, the base's Hub id, the license, our tags added (theirs kept, but no base_model:adapter: tag of another or
    a local base), pipeline_tag from the task type when it has none."""
    data = ModelCardData(**data.to_dict())  # a copy
    theirs = data.get("tags") or []
    theirs = [theirs] if isinstance(theirs, str) else [t for t in theirs if isinstance(t, str)]
    stale = [t for t in theirs if t.startswith("base_model:adapter:") and t != f"base_model:adapter:{hub_base}"]
    ours = ["peft", "peft-ext", *spec.tags, *([f"base_model:adapter:{hub_base}"] if hub_base else []), *extra_tags]
    data["tags"] = list(dict.fromkeys([t for t in theirs if t not in stale] + ours))
    data["library_name"] = "peft"
    if hub_base:
        data["base_model"] = hub_base
    elif not (isinstance(data.get("base_model"), str) and _is_repo_id(data.get("base_model"), allow_bare=True)):
        data.pop("base_model", None)  # PEFT writes the local path (or '') it was given
    for key in ("license", "license_name", "license_link"):
        data.pop(key, None)
    for key, value in licensing.items():
        data[key] = value
    if not data.get("pipeline_tag") and config.get("task_type") in TASK_TO_PIPELINE:
        data["pipeline_tag"] = TASK_TO_PIPELINE[config["task_type"]]
    return data


def template_path(name: str) -> Any:
    """A model card template shipped inside the package (`peft_ext/cards/`, package data), as a Traversable."""
    root = resources.files("peft_ext") / "cards"
    path = root / name
    if not path.is_file():
        raise FileNotFoundError(f"model card template {name!r} not found in {root}; reinstall peft-ext")
    return path


def _check_kind(kind: str) -> str:
    if not isinstance(kind, str) or kind not in CARD_KINDS:
        raise ValueError(f"kind={kind!r} is not a card kind; choose one of {', '.join(CARD_KINDS)}")
    return kind


def _check_license(license: Any) -> None:
    if not isinstance(license, str) or not LICENSE_RE.match(license):
        raise ValueError(f"license={license!r} is not a Hub license id: use a lowercase id from "
                         "https://huggingface.co/docs/hub/repositories-licenses such as 'apache-2.0', 'mit' or 'other'")


def _check_tags(tags: Any) -> list[str]:
    # a bare string is iterable too: it would become one tag per character
    if isinstance(tags, (str, bytes)) or not isinstance(tags, Iterable):
        raise TypeError(f"extra_tags={tags!r} must be a list of tag strings, e.g. ['text-classification']")
    tags = list(tags)
    for i, tag in enumerate(tags):
        if not isinstance(tag, str) or not tag.strip() or any(c.isspace() and c != " " for c in tag):
            raise ValueError(f"extra_tags[{i}]={tag!r} must be a non-empty one-line string, e.g. 'text-classification'")
    return tags


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):  # "no" or 0 would otherwise be read as truthy/falsy by accident
        raise TypeError(f"{name}={value!r} must be True or False")


def _check_timeout(timeout: Any) -> float:
    fix = (f"must be a positive number of seconds: how long to wait for the server to accept a connection and then "
           f"for each piece of its answer (default {DEFAULT_TIMEOUT:g})")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout={timeout!r} {fix}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout={timeout!r} {fix}")
    return float(timeout)


def _base_model_id(explicit: str | None, recorded: Any, require: bool = False) -> str | None:
    """The base model's Hub id for the card metadata and the pushed adapter_config.json, or None when only a local
    path is known (`require`: refused instead, as a push must: nobody else could load the adapter by repo id)."""
    if explicit is not None:
        if not _is_hub_id(explicit):
            raise ValueError(f"base_model={explicit!r} is not a Hub model id; pass the base's repo id, e.g. "
                             "'google-bert/bert-base-uncased'")
        return explicit
    fix = ("pass base_model='namespace/name' (--base-model) naming the base on the Hub; it is written into the pushed "
           f"{CONFIG_FILE} (your folder is not changed)")
    if not recorded:
        if require:
            raise ValueError(f"{CONFIG_FILE} names no base model (base_model_name_or_path={recorded!r}), so "
                             f"AutoPeftModel.from_pretrained('<repo>') cannot load it; {fix}")
        warnings.warn("the adapter names no base model (base_model_name_or_path is empty): the card cannot link "
                      "it; pass base_model='namespace/name'", stacklevel=4)
        return None
    if not _is_hub_id(recorded):
        if require:
            raise ValueError(f"{CONFIG_FILE} has base_model_name_or_path={recorded!r}, a local path: "
                             f"AutoPeftModel.from_pretrained('<repo>') would fail for everyone else; {fix}")
        warnings.warn(f"the adapter's base model {recorded!r} is a local path, not a Hub id: it is left out of the "
                      "card; pass base_model='namespace/name' to link the base on the Hub", stacklevel=4)
        return None
    return recorded


def _is_hub_id(value: Any) -> bool:
    return isinstance(value, str) and not os.path.isabs(value) and not os.path.exists(value) and \
        _is_repo_id(value, allow_bare=True)


def _is_repo_id(value: str, allow_bare: bool = False) -> bool:
    if not isinstance(value, str) or (value.count("/") != 1 and not (allow_bare and "/" not in value)):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _check_repo_id(repo_id: Any) -> None:
    if not _is_repo_id(repo_id):
        raise ValueError(f"repo_id={repo_id!r} is not a Hub repo id: use 'namespace/name' with letters, digits, "
                         "'-', '_' or '.' (no '--' or '..', at most 96 characters), e.g. 'your-username/my-adapter'")


def _base_class(config: dict[str, Any]) -> str:
    mapping = config.get("auto_mapping") or {}
    if str(mapping.get("parent_library", "")).startswith("transformers") and mapping.get("base_model_class"):
        return mapping["base_model_class"]
    return TASK_TO_AUTO_CLASS.get(config.get("task_type"), "AutoModel")


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def _modules(value: Any) -> str:
    if isinstance(value, str):
        return f"`{value}`"
    names = sorted(value or [])
    if len(names) <= 8:
        return ", ".join(f"`{n}`" for n in names) or "—"
    counts = Counter(n.split(".")[-1] for n in names)  # exported LoRAs list every layer: group by layer kind
    return f"{len(names)} modules: " + ", ".join(f"`{k}` ×{v}" for k, v in sorted(counts.items()))


def _config_table(config: dict[str, Any], spec: CardKind, shown_base: str) -> str:
    rows = [["base model", shown_base], ["PEFT type", f"`{config['peft_type']}`"],
            ["target modules", _modules(config.get("target_modules"))]]
    for name in spec.fields:
        value = config.get(name)
        if value is not None and value != {} and value != []:
            rows.append([f"`{name}`", _value(value)])
    return _md_table(["setting", "value"], rows)


def _value(value: Any) -> str:
    return f"`{value if isinstance(value, str) else json.dumps(value)}`"


def _cut(rows: list[list[str]], what: str) -> tuple[list[list[str]], str]:
    if len(rows) <= MAX_TABLE_ROWS:
        return rows, ""
    return rows[:MAX_TABLE_ROWS], f"\n\n… and {len(rows) - MAX_TABLE_ROWS} more layers: see {what} in this repository."


# ---- NullSpaceLoRA verification report


def _nullspace_report(folder: Path, report: NullSpaceReport | PathLike | dict[str, Any] | None) -> dict[str, Any] | None:
    """The report as the dict `NullSpaceReport.to_dict` gives, from the argument or the folder; checked."""
    where = "report"
    if report is None:
        path = folder / NULLSPACE_REPORT
        if not path.is_file():
            return None
        report, where = path, str(path)
    if isinstance(report, NullSpaceReport):
        data = report.to_dict()
    elif isinstance(report, dict):
        data = report
    elif isinstance(report, (str, os.PathLike)):
        where = str(report)
        if not os.path.isfile(report):
            raise ValueError(f"report={where!r} does not exist; pass a NullSpaceReport or the path of its save_json")
        data = _read_json(Path(report), "write it with report.save_json(path)")
    else:
        raise TypeError(f"report must be a NullSpaceReport, a JSON path or a dict, got {type(report).__name__}")
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list):
        raise ValueError(f"{where} has no 'layers' list: not a NullSpaceReport (write it with report.save_json(path))")
    _check_rows(layers, where, NULLSPACE_LAYER_KEYS, numbers=NULLSPACE_NUMBERS,
                fix="write the report with NullSpaceReport.save_json")
    for i, layer in enumerate(layers):
        if not isinstance(layer["flags"], list) or not all(isinstance(f, str) for f in layer["flags"]):
            raise ValueError(f"{where}: layers[{i}]['flags']={layer['flags']!r} is not a list of strings; write the "
                             "report with NullSpaceReport.save_json")
    return data


def _check_rows(rows: list[Any], where: str, keys: tuple[str, ...], numbers: tuple[str, ...], fix: str) -> None:
    """Each row a JSON object with every key, numbers where the card formats numbers (a string there would fail deep
    inside the template with a message naming no field)."""
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: layers[{i}] is {row!r}, not an object; {fix}")
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{where}: layers[{i}] lacks {missing}; {fix}")
        for key in numbers:
            if not _is_number(row[key]):
                raise ValueError(f"{where}: layers[{i}][{key!r}]={row[key]!r} is not a number; {fix}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _nullspace_variables(data: dict[str, Any] | None, config: dict[str, Any]) -> dict[str, Any]:
    if data is None:
        return {}
    if data.get("mode") not in (None, config.get("mode")):
        raise ValueError(f"the NullSpaceLoRA report has mode={data.get('mode')!r} but the adapter has "
                         f"mode={config.get('mode')!r}: it belongs to another adapter; pass that adapter's report")
    head = ["layer", "d_in", "r", "tokens", "λmin/λmax", "tail energy", "‖Ax‖/‖x‖ held-out", "‖ΔWx‖/‖x‖ init",
            "flags"]
    rows = [[f"`{lr['layer']}`", lr["in_features"], lr["r"], lr["tokens"], f"{lr['eig_ratio']:.2e}",
             f"{lr['tail_energy']:.2e}", f"{lr['heldout_ratio']:.2e}", f"{lr['init_output_ratio']:.1e}",
             ", ".join(f.split(":")[0] for f in lr["flags"]) or "ok"] for lr in data["layers"]]
    rows, more = _cut(rows, f"`{NULLSPACE_REPORT}`")
    flagged = sum(1 for lr in data["layers"] if lr["flags"])
    summary = (f"Adapter `{data.get('adapter_name', 'default')}`, mode `{data.get('mode')}`; held-out tokens: "
               f"{data.get('heldout', 'not recorded')}. {len(data['layers'])} layers, {flagged} flagged.")
    return {"report_summary": summary, "report_table": _md_table(head, rows) + more}


# ---- LoRA-X transfer report


def _lorax_report(folder: Path) -> dict[str, Any]:
    path = folder / LORAX_REPORT
    if not path.is_file():
        raise ValueError(f"kind='lorax' needs {path}; write the adapter with the LoRA-X converter (peft_ext.lorax)")
    fix = "rerun the LoRA-X conversion to rewrite it"
    data = _read_json(path, fix)
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a LoRA-X report object; {fix}")
    for key, kind in (("layers", list), ("summary", dict), ("source_base", str), ("target_base", str)):
        if not isinstance(data.get(key), kind):
            raise ValueError(f"{path}: field {key!r} is {data.get(key)!r}, expected a {kind.__name__}; {fix}")
    _check_rows(data["layers"], str(path), LORAX_LAYER_KEYS, LORAX_NUMBERS, fix)
    missing = [k for k in LORAX_SUMMARY_KEYS if k not in data["summary"]]
    if missing:
        raise ValueError(f"{path}: summary lacks {missing}; {fix}")
    for key in LORAX_SUMMARY_NUMBERS:
        if not _is_number(data["summary"][key]):
            raise ValueError(f"{path}: summary[{key!r}]={data['summary'][key]!r} is not a number; {fix}")
    for key in ("settings", "baselines"):  # optional, but read as mappings by the card
        if not isinstance(data.get(key) or {}, dict):
            raise ValueError(f"{path}: field {key!r} is {data[key]!r}, expected an object; {fix}")
    if not all(isinstance(v, dict) for v in (data.get("baselines") or {}).values()):
        raise ValueError(f"{path}: field 'baselines' maps names to {data['baselines']!r}, expected objects with "
                         f"'energy_kept'; {fix}")
    return data


def _lorax_variables(data: dict[str, Any]) -> dict[str, Any]:
    s, baselines = data["summary"], data.get("baselines") or {}

    def base_energy(name: str) -> str:
        value = (baselines.get(name) or {}).get("energy_kept")
        return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"

    shape = lambda v: "×".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)  # noqa: E731
    rows = [[f"`{lt['name']}`", shape(lt["shape"]), f"{lt['phi_u']:.3f}", f"{lt['phi_v']:.3f}",
             f"{lt['energy_kept']:.3f}", lt["rank"], lt["action"]] for lt in data["layers"]]
    rows, more = _cut(rows, f"`{LORAX_REPORT}`")
    summary = (f"Method `{data.get('method', 'lorax')}`, from `{data['source_base']}` to `{data['target_base']}`. "
               f"{s['layers']} layers: {s['transferred']} transferred, {s['dropped']} dropped, {s['copied']} copied; "
               f"energy kept {s['energy_kept']:.3f} (baselines: copy {base_energy('copy')}, delta-sigma "
               f"{base_energy('delta-sigma')}); mean φ_U {s['mean_phi_u']:.3f}, mean φ_V {s['mean_phi_v']:.3f}.")
    settings = data.get("settings") or {}
    return {
        "source_base": f"`{data['source_base']}`",
        "report_summary": summary,
        "report_table": _md_table(["layer", "shape", "φ_U", "φ_V", "energy kept", "rank", "action"], rows) + more,
        "settings_table": _md_table(["setting", "value"], [[f"`{k}`", _value(v)] for k, v in settings.items()])
        if settings else None,
    }


def _export_source(folder: Path) -> str | None:
    marker = read_export_marker(folder)
    source = marker.get("source_peft_type") if marker else None
    return f"`{source}`" if isinstance(source, str) and source else None


# ------------------------------------------------------------------------------------------------ push / pull


def push_adapter(
    adapter_dir: PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    license: str | None = None,
    calibration: str | None = None,
    base_model: str | None = None,
    kind: str | None = None,
    report: NullSpaceReport | PathLike | dict[str, Any] | None = None,
    extra_tags: Iterable[str] = (),
    training_args: Any = None,
    check_base: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> CommitInfo:
    """Upload an adapter folder and its model card to `repo_id` in one commit; return the commit.

    `adapter_dir` is what `model.save_pretrained(dir)` or `trainer.save_model(dir)` wrote, or a Trainer checkpoint:
    the Trainer's own files (training_args.bin, optimizer.pt, trainer_state.json, ...) are skipped with one warning;
    tokenizer files are uploaded; any other pickle is refused. The card merges with the folder's README.md (see
    `render_card`). The base model: `base_model` (a Hub id), else the adapter's `base_model_name_or_path` when that
    is a Hub id; a local path is refused. Its Hub id is written into the pushed adapter_config.json (the folder is not
    changed), so `AutoPeftModel*.from_pretrained(repo_id)` finds the base, and with `check_base` it is looked up on
    the server pushed to first (its card also gives the license when `license` is None and the folder's card names
    none); pass `check_base=False` for a base the server cannot show (another server, a private repo of someone
    else). `training_args` (trainer.args) adds the training hyperparameters to the card.

    Validation (arguments, repo id, every adapter file, the base model, card rendering) happens before the first
    write request, so a refused push creates nothing. The repo is created if needed (`private` applies only then);
    `revision` is a branch, created from main if missing. `report` (a NullSpaceReport or its JSON) is uploaded as
    nullspace_report.json and shown in the card. Adapter files on the branch that this folder lacks (an old report,
    a stale `adapter_model.bin`) are deleted in the same commit. Load the result with
    `PeftModel.from_pretrained(base, repo_id, revision=...)`.

    `timeout` (seconds) bounds the wait for a connection and for each piece of every answer; requests that are safe
    to repeat are retried (`RETRY_WAITS`), the commit is not. The commit names the head it was built on, so a push that
    raced another one is refused whole by the server rather than mixed with it. Failures of the server or the
    network raise `HubTransferError` saying whether anything was committed. (Files huggingface_hub sends through
    Xet, the Hub's storage for large files, travel outside these HTTP requests, under hf_xet's own timeouts.)
    """
    _check_repo_id(repo_id)
    _check_branch(revision)
    _check_flag("private", private)
    _check_flag("create_pr", create_pr)
    timeout = _check_timeout(timeout)
    if commit_message is not None and (not isinstance(commit_message, str) or not commit_message.strip()):
        raise ValueError(f"commit_message={commit_message!r} must be a non-empty string, or None for the default "
                         "('Upload <kind> adapter (peft-ext)')")
    _check_flag("check_base", check_base)
    files, skipped = _checked_and_skipped(adapter_dir)
    config = _local_config(adapter_dir)
    kind = _check_kind(kind if kind is not None else adapter_kind(adapter_dir))
    # everything render_card checks that needs no request, before the first one
    if license is not None:
        _check_license(license)
    _check_tags(extra_tags)
    if calibration is not None and not isinstance(calibration, str):
        raise TypeError(f"calibration={calibration!r} must be a string (one line on the calibration data, shown in "
                        "the card) or None")
    report_data = _nullspace_report(Path(adapter_dir), report) if report is not None and kind == "nullspace_lora" \
        else None
    _hyperparameters(training_args, Path(adapter_dir))
    recorded = _lorax_report(Path(adapter_dir))["target_base"] if kind == "lorax" else \
        config.get("base_model_name_or_path")
    hub_base = _base_model_id(base_model, recorded, require=True)

    api = HfApi(token=token)
    nothing = "nothing was committed"
    own = _folder_card(Path(adapter_dir))
    want_card = license is None and not (own is not None and isinstance(own.data.get("license"), str))
    base_card = _base_on_hub(api, hub_base, config.get("revision"), token, timeout, want_card) if check_base \
        else None
    card, _ = _render_card(adapter_dir, repo_id=repo_id, base_model=hub_base, license=license,
                           calibration=calibration, extra_tags=extra_tags, kind=kind, report=report,
                           training_args=training_args, base_card=base_card, require_base=True)
    generated = {CARD_FILE: str(card).encode("utf-8")}
    if report_data is not None:
        generated[NULLSPACE_REPORT] = (json.dumps(report_data, indent=2) + "\n").encode()
    if config.get("base_model_name_or_path") != hub_base:  # the pushed copy names the base by its Hub id
        # written as PEFT's save_pretrained writes it, so the two files differ in that one line only
        generated[CONFIG_FILE] = json.dumps({**config, "base_model_name_or_path": hub_base}, indent=2,
                                            sort_keys=True).encode()
    title = CARD_KINDS[kind].title
    if skipped:
        warnings.warn(f"adapter_dir={os.fspath(adapter_dir)!r}: not uploading {', '.join(sorted(skipped))}: "
                      "training state the Trainer writes beside the adapter, not part of it (and pickles are never "
                      "uploaded)",
                      stacklevel=2)
    _hub_call(lambda: api.create_repo(repo_id, private=private, exist_ok=True), timeout, nothing)
    branch = revision or "main"
    if branch != "main":  # from main; an existing branch is kept as is
        _hub_call(lambda: api.create_branch(repo_id, branch=branch, exist_ok=True), timeout, nothing)
    head = _hub_call(lambda: api.repo_info(repo_id, revision=branch), timeout, nothing)
    uploads = set(files) | set(generated)
    stale = [s.rfilename for s in head.siblings or [] if s.rfilename in ADAPTER_FILES and s.rfilename not in uploads]
    operations: list[Any] = [CommitOperationDelete(path_in_repo=p) for p in stale]
    # the validated paths: a link's checked target, not a name that could be re-pointed before the upload
    operations += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(path)) for p, path in files.items()
                   if p not in generated]
    operations += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=data) for p, data in generated.items()]

    def landed() -> str:
        """After a failed commit request: what is on the branch now, so the user knows whether to push again."""
        if create_pr:
            return (f"a pull request may have been opened all the same: look at {api.endpoint}/{repo_id}/discussions "
                    "before pushing again")
        try:
            now = _hub_call(lambda: api.repo_info(repo_id, revision=branch).sha, timeout, "")
        except Exception:  # noqa: BLE001 - the check is a courtesy; the original failure is what gets raised
            return (f"whether the commit landed is unknown (checking failed too): look at {api.endpoint}/{repo_id}/"
                    f"commits/{branch} before pushing again")
        if now == head.sha:
            return f"nothing was committed ({branch} is still at {now})"
        return (f"{branch} moved to {now}: check whether that commit ({api.endpoint}/{repo_id}/commit/{now}) is this "
                "upload before pushing again")

    try:
        message = commit_message or f"Upload {title} adapter (peft-ext)"
        return _hub_call(lambda: api.create_commit(repo_id, operations, revision=branch, create_pr=create_pr,
                                                   commit_message=message, parent_commit=head.sha),
                         timeout, landed, retry=())
    except HfHubHTTPError as e:
        if e.response is None or e.response.status_code != 412:
            raise
        now = _hub_call(lambda: api.repo_info(repo_id, revision=branch).sha, timeout, "")
        raise HubTransferError(f"{repo_id}: {branch} moved to {now} while pushing (another commit landed after this "
                               f"push read {head.sha}); nothing was committed: push again to upload on top of it, "
                               "or to another branch with revision=") from e


def _base_on_hub(api: HfApi, base: str, revision: Any, token: str | None, timeout: float,
                 want_card: bool) -> dict[str, Any]:
    """Check that the base model exists on the server pushed to (at the adapter's recorded base `revision`); return
    its card's metadata (for the license: its README.md is read only if `want_card`), {} when it has none."""
    rev = revision if isinstance(revision, str) and revision else None
    fix = ("pass the base's Hub id with base_model= (--base-model), or check_base=False (--no-check-base) if the base "
           "lives where this server cannot show it")
    try:
        info = _hub_call(lambda: api.model_info(base, revision=rev), timeout, "nothing was committed")
    except RevisionNotFoundError as e:
        raise ValueError(f"the base model {base!r} has no revision {rev!r} (adapter_config.json's revision) on "
                         f"{api.endpoint}; fix the revision in the adapter folder, or {fix}") from e
    except RepositoryNotFoundError as e:  # also a private repo this token cannot see
        raise ValueError(f"the base model {base!r} is not a model repo on {api.endpoint} that this token can see, so "
                         f"AutoPeftModel.from_pretrained(<this repo>) would fail for everyone else; {fix}") from e
    meta = info.card_data.to_dict() if getattr(info, "card_data", None) is not None else {}
    if not want_card or meta.get("license") or CARD_FILE not in {s.rfilename for s in info.siblings or []}:
        return meta
    try:
        path = _hub_call(lambda: hf_hub_download(base, CARD_FILE, revision=info.sha, token=token), timeout,
                         "nothing was committed")
        return ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    except HubTransferError:
        raise
    except (HfHubHTTPError, ValueError, OSError):  # a card we cannot read names no license: license= decides
        return meta


def _check_branch(revision: str | None) -> None:
    if revision is None:
        return
    if not isinstance(revision, str) or not revision.strip() or revision.startswith("refs/"):
        raise ValueError(f"revision={revision!r} must be a branch name such as 'v2' (created from main if missing)")
    if len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        raise ValueError(f"revision={revision!r} is a commit sha; a push needs a branch name (commits are immutable)")


def pull_adapter(repo_id: str, *, revision: str | None = None, local_dir: PathLike | None = None,
                 token: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Download an adapter repo's safe files (JSON, safetensors, README.md; never pickles); return the folder.

    Not needed to load an adapter: `PeftModel.from_pretrained(base, repo_id, revision=...)` downloads it itself.
    Useful to inspect it, convert it (`peft-ext export-lora`) or keep a copy (`local_dir`).

    The repo's file list is checked first (an adapter_config.json and adapter_model.safetensors must be there; a repo
    with only pickle weights is refused), so a refused pull downloads nothing. All files come from one commit (the
    one `revision` names when the pull starts). With `local_dir`, they land in a temporary folder beside it, are
    validated like a push (whole safetensors files, JSON, the config), and only then replace `local_dir` as a
    whole: a failure, a refusal or a killed process leaves the previous copy as it was. `local_dir` must be new,
    empty or a previous adapter copy: a folder holding other files (a project, a `.git`) is refused, since they
    would be deleted. A symlinked `local_dir` keeps its link. Without `local_dir` the files go to the
    huggingface_hub cache (each file complete or absent, as the cache guarantees; adapter_config.json last, so an
    interrupted pull never looks like an adapter) and its snapshot folder is returned once validated.

    `timeout` is as for `push_adapter`; reads and failed (5xx) downloads are retried, and huggingface_hub resumes
    interrupted downloads itself.
    """
    _check_repo_id(repo_id)
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ValueError(f"revision={revision!r} must be a branch, tag or commit sha, or None for main")
    timeout = _check_timeout(timeout)
    target = _check_local_dir(local_dir) if local_dir is not None else None
    api = HfApi(token=token)
    where = f"{repo_id} at revision {revision or 'main'}"
    outcome = ("nothing was written to local_dir (a previous copy there is untouched)" if target else
               "no folder was returned (the files fetched so far stay in the huggingface_hub cache, each complete)")
    info = _hub_call(lambda: api.repo_info(repo_id, revision=revision), timeout, outcome)
    names = _pull_plan(sorted(s.rfilename for s in info.siblings or []), where)
    fix = ("the repo holds a broken adapter: ask its owner to push it again (peft_ext.hub.push_adapter checks every "
           "file before uploading)")

    def download(name: str, folder: str | None) -> Path:
        try:
            return Path(_hub_call(lambda: hf_hub_download(repo_id, name, revision=info.sha, local_dir=folder,
                                                          token=token), timeout, outcome, retry=("status",)))
        except (HubTransferError, HfHubHTTPError):
            raise
        except OSError as e:  # e.g. huggingface_hub's size check of a cut download; its advice does not apply here
            raise HubTransferError(f"downloading {name} from {api.endpoint} failed: {_one_line(e)}; {outcome}; try "
                                   "again") from e

    if target is None:
        files = {name: download(name, None) for name in names}
        folder = files[CONFIG_FILE].parent
        _validate_adapter_files(folder, files, where, lambda name: f"{where}: {name}", fix)
        return str(folder)
    with atomic_directory(target, overwrite=True, field="local_dir") as tmp:
        files = {name: download(name, tmp) for name in names}
        _validate_adapter_files(Path(tmp), files, where, lambda name: f"{where}: {name}", fix)
    return os.path.abspath(local_dir)


def _pull_plan(names: list[str], where: str) -> list[str]:
    """The files a pull downloads, in order (adapter_config.json last), or the refusal the file list already
    justifies, before any download."""
    if CONFIG_FILE not in names:
        raise ValueError(f"{where} has no {CONFIG_FILE}: not a PEFT adapter repo (it holds {names[:8]}); check "
                         "repo_id and revision")
    if WEIGHTS_FILE not in names:
        pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES) and "/" not in n]
        if pickles:
            raise ValueError(f"{where} has only pickle weights {pickles}, which peft-ext never downloads (loading a "
                             f"pickle can run arbitrary code); ask the repo's owner to push {WEIGHTS_FILE} "
                             "(model.save_pretrained writes it by default)")
        raise ValueError(f"{where} has {CONFIG_FILE} but no {WEIGHTS_FILE}: the adapter's weights are missing; ask "
                         "the repo's owner to push the whole adapter folder")
    wanted = [n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in PULL_PATTERNS)]
    return sorted(wanted, key=lambda n: (n == CONFIG_FILE, n))


def _check_local_dir(local_dir: Any) -> Path:
    """The real folder a pull replaces, after making sure nothing but a previous adapter copy would be lost."""
    if not isinstance(local_dir, (str, os.PathLike)):
        raise TypeError(f"local_dir={local_dir!r} must be a folder path (str or os.PathLike)")
    shown = str(local_dir)
    real = Path(os.path.realpath(local_dir))  # a symlinked local_dir: replace the folder it points to, keep the link
    if not real.exists():
        return real
    if not real.is_dir():
        raise ValueError(f"local_dir={shown!r} is a file; pass a folder path (new, empty, or a previous adapter copy "
                         "to replace)")
    foreign, entries = [], []
    for dirpath, dirnames, filenames in os.walk(real, followlinks=False):
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            rel = (here / name).relative_to(real).as_posix()
            if rel == ".cache":  # huggingface_hub's download records of a previous pull
                dirnames.remove(name)
                continue
            entries.append(rel)
            is_dir = name in dirnames and not (here / name).is_symlink()
            if name.startswith(".") or (not is_dir and not any(fnmatch.fnmatch(rel, p) for p in PULL_PATTERNS)):
                foreign.append(rel)
                if name in dirnames:
                    dirnames.remove(name)
    if foreign:
        raise ValueError(f"local_dir={shown!r} holds {foreign[:8]}, which a pull would delete (it replaces the "
                         "folder as a whole); pass a new or empty folder, or move those files out")
    if entries and not (real / CONFIG_FILE).is_file():
        raise ValueError(f"local_dir={shown!r} is not an adapter copy (no {CONFIG_FILE}) and not empty; pass a new "
                         "or empty folder")
    return real


# ------------------------------------------------------------------------------------------------ requests


class HubTransferError(OSError):
    """The server or the network did not complete a push or a pull. The message is one line: the server, the
    request, what happened to the data (nothing committed / nothing written) and what to do."""


class HubTimeoutError(HubTransferError, TimeoutError):
    """A request got no answer within `timeout` (after its retries)."""


_T = TypeVar("_T")
# The timeout of the push/pull running in this thread (context): huggingface_hub's shared HTTP client has none, and
# its API methods take none, so a request hook applies ours to each request this thread sends while it is set.
_TIMEOUT: contextvars.ContextVar[float | None] = contextvars.ContextVar("peft_ext_hub_timeout", default=None)


def _apply_timeout(request: httpx2.Request) -> None:
    seconds = _TIMEOUT.get()
    if seconds is not None:
        request.extensions = {**request.extensions,
                              "timeout": dict.fromkeys(("connect", "read", "write", "pool"), seconds)}


def _hook_timeouts() -> None:
    """Add `_apply_timeout` to huggingface_hub's current shared client (it is re-created after connection errors and
    by `set_client_factory`, hence checked before every call). It acts only inside our calls, so other users of the
    client keep their own settings."""
    client = get_session()
    hooks = client.event_hooks
    if _apply_timeout not in hooks["request"]:
        client.event_hooks = {**hooks, "request": [*hooks["request"], _apply_timeout]}


def _hub_call(call: Callable[[], _T], timeout: float, outcome: str | Callable[[], str],
              retry: tuple[str, ...] = ("timeout", "network", "status")) -> _T:
    """Run one huggingface_hub call under `timeout`, retrying the failures named in `retry` after `RETRY_WAITS`;
    a failure that persists becomes a `HubTransferError` whose message ends with `outcome` (what happened to the
    data). Other errors (a 404, a refused token, bad input) pass unchanged."""
    reset = _TIMEOUT.set(timeout)
    try:
        tries = 0
        while True:
            tries += 1
            _hook_timeouts()
            try:
                return call()
            except Exception as e:  # noqa: BLE001 - sorted below; what is not a transfer failure is re-raised
                kind = _transfer_failure(e)
                if kind is None:
                    raise
                if kind[0] not in retry or tries > len(RETRY_WAITS):
                    said = outcome() if callable(outcome) else outcome
                    raise _transfer_error(kind, tries, timeout, said) from e
                time.sleep(RETRY_WAITS[tries - 1])
    finally:
        _TIMEOUT.reset(reset)


def _transfer_failure(error: BaseException) -> tuple[str, BaseException] | None:
    """("timeout" | "network" | "status", the exception that says so) if `error` (or its explicit cause:
    huggingface_hub raises a failed file lookup `from` the network error) is a timeout, a lost connection or a
    busy/failing server."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, httpx2.TimeoutException):
            return "timeout", error
        if isinstance(error, (httpx2.NetworkError, httpx2.RemoteProtocolError)):
            return "network", error
        if isinstance(error, HfHubHTTPError) and error.response is not None and \
                error.response.status_code in RETRY_STATUS:
            return "status", error
        error, seen = error.__cause__, seen + 1
    return None


def _transfer_error(kind: tuple[str, BaseException], tries: int, timeout: float, outcome: str) -> HubTransferError:
    what, error = kind
    request = None
    try:
        request = error.response.request if isinstance(error, HfHubHTTPError) else error.request  # type: ignore
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError for an exception made without a request
        pass
    server = f"{request.url.scheme}://{request.url.netloc.decode()}" if request is not None else "the Hub server"
    asked = f"{request.method} {request.url.path}" if request is not None else "a request"
    count = f"{tries} {'try' if tries == 1 else 'tries'}"
    if what == "timeout":
        verb = "accept a connection for" if isinstance(error, httpx2.ConnectTimeout) else "answer"
        return HubTimeoutError(f"{server} did not {verb} {asked} within timeout={timeout:g} s ({count}); {outcome}; "
                               "check that the server is up and reachable (HF_ENDPOINT), then try again or pass a "
                               "larger timeout=")
    if what == "network":
        return HubTransferError(f"could not talk to {server} for {asked} ({type(error).__name__}: {_one_line(error)}; "
                                f"{count}); {outcome}; check the network and HF_ENDPOINT, then try again")
    status = error.response.status_code  # type: ignore[attr-defined]
    said = getattr(error, "server_message", None) or _one_line(error)
    return HubTransferError(f"{server} answered {status} to {asked} ({count}): {_one_line(said)}; {outcome}; the "
                            "server is busy or failing: try again later")
