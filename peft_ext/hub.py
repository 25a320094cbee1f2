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

Kinds of adapter and their cards (templates in `hub_cards/`): `nullspace_lora`, `subspace_lora` (our PEFT types),
`lorax` (a LoRA written by the LoRA-X converter: it has a `lorax_report.json`), `lora_export` (a LoRA exported from a
peft-ext adapter: `export_to_lora` writes a `peft_ext_export.json` marker next to it) and `lora` (any other LoRA).
"""

from __future__ import annotations

import contextvars
import fnmatch
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
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import get_session, validate_repo_id

from .export import EXPORT_MARKER
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
PULL_PATTERNS = ["*.json", "*.safetensors", CARD_FILE]  # never pickles
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
LICENSE_RE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
# bits per element of each safetensors dtype, to check every tensor's byte span against its shape
SAFETENSORS_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
                    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
                    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
MAX_SAFETENSORS_HEADER = 100_000_000  # the limit safetensors itself enforces


@dataclass(frozen=True)
class CardKind:
    """How to describe one kind of adapter: its template in hub_cards/, Hub tags and the config fields shown."""

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


def read_adapter_config(adapter_dir: PathLike) -> dict[str, Any]:
    """adapter_config.json of a local adapter folder, with errors that say how to get a valid one."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise ValueError(f"adapter_dir={str(adapter_dir)!r} is not a directory; pass the folder written by "
                         "model.save_pretrained(folder)")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"adapter_dir={str(adapter_dir)!r} has no {CONFIG_FILE}, so it is not a PEFT adapter folder; "
                         "write one with model.save_pretrained(folder) on a PeftModel")
    return _read_config(path, "re-save the adapter with model.save_pretrained(folder)")


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
    peft_type = read_adapter_config(adapter_dir)["peft_type"]
    folder = Path(adapter_dir)
    if peft_type == "LORA":
        if (folder / LORAX_REPORT).is_file():
            return "lorax"
        return "lora_export" if (folder / EXPORT_MARKER).is_file() else "lora"
    if peft_type.lower() in CARD_KINDS:
        return peft_type.lower()
    raise ValueError(f"{CONFIG_FILE} has peft_type={peft_type!r}, for which peft-ext has no model card (kinds: "
                     f"{', '.join(CARD_KINDS)}); upload it with huggingface_hub.upload_folder, or add a template to "
                     "hub_cards/ and a line to peft_ext.hub.CARD_KINDS")


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
    read_adapter_config(adapter_dir)  # the plain "not an adapter folder" errors first
    where = f"adapter_dir={str(adapter_dir)!r}"
    files = _adapter_files(Path(adapter_dir), where)
    _validate_adapter_files(Path(adapter_dir), files, where, lambda name: str(Path(adapter_dir) / name),
                            "re-save the adapter with model.save_pretrained(folder)")
    return files


def _adapter_files(folder: Path, where: str) -> dict[str, Path]:
    """Every non-hidden file under `folder` that a push uploads: relative POSIX name -> the path to read.

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
        for name in list(dirnames):
            if name.startswith("."):
                dirnames.remove(name)
            elif (here / name).is_symlink():
                rel = (here / name).relative_to(root).as_posix()
                raise ValueError(f"{where}: {rel!r} is a link to a directory ({os.readlink(here / name)}); peft-ext "
                                 "does not follow directory links (they can lead out of the folder or loop): replace "
                                 "it with a real folder holding the files, or remove it")
        for name in filenames:
            if name.startswith("."):
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
    license: str = "apache-2.0",
    calibration: str | None = None,
    extra_tags: Iterable[str] = (),
    kind: str | None = None,
    report: NullSpaceReport | PathLike | dict[str, Any] | None = None,
) -> ModelCard:
    """The model card (README.md) for an adapter folder, from the `hub_cards/` template of its kind.

    `base_model` names the base on the Hub; by default it is the adapter's `base_model_name_or_path` (for LoRA-X,
    the report's `target_base`) when that is a Hub id; a local path is left out of the metadata (with a warning),
    since the Hub links base models by id. `report` is a NullSpaceLoRA verification report (object, JSON path or
    dict); without it the folder's `nullspace_report.json` is used if present.
    """
    config = read_adapter_config(adapter_dir)
    kind = _check_kind(kind if kind is not None else adapter_kind(adapter_dir))
    spec = CARD_KINDS[kind]
    if repo_id is not None:
        _check_repo_id(repo_id)
    _check_license(license)
    extra_tags = _check_tags(extra_tags)
    if calibration is not None and not isinstance(calibration, str):
        raise TypeError(f"calibration={calibration!r} must be a string (one line on the calibration data, shown in "
                        "the card) or None")
    if report is not None and kind != "nullspace_lora":
        raise ValueError(f"report= is a NullSpaceLoRA verification report, but this adapter is a {kind!r}; drop it")
    lorax = _lorax_report(Path(adapter_dir)) if kind == "lorax" else None
    hub_base = _base_model_id(base_model, lorax["target_base"] if lorax else config.get("base_model_name_or_path"))
    shown_base = f"`{hub_base}`" if hub_base else "a local base model (not named on the Hub)"
    tags = list(dict.fromkeys(["peft", "peft-ext", *spec.tags,
                               *([f"base_model:adapter:{hub_base}"] if hub_base else []), *extra_tags]))
    data = ModelCardData(library_name="peft", base_model=hub_base, license=license, tags=tags)
    repo = repo_id or "<namespace>/<adapter>"
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
    }
    if kind == "nullspace_lora":
        variables.update(_nullspace_variables(_nullspace_report(Path(adapter_dir), report), config))
    elif kind == "lorax":
        variables.update(_lorax_variables(lorax))
    elif kind == "lora_export":
        variables["export_source"] = _export_source(Path(adapter_dir))
    with resources.as_file(template_path(spec.template)) as path:
        return ModelCard.from_template(data, template_path=str(path), **variables)


def template_path(name: str) -> Any:
    """A template of the `hub_cards` package (a Traversable). Falls back to the source checkout's hub_cards/ for an
    editable install made before hub_cards was a package."""
    try:
        root = resources.files("hub_cards")
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parent.parent / "hub_cards"
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


def _base_model_id(explicit: str | None, recorded: str | None) -> str | None:
    """The base model's Hub id for the card metadata, or None when only a local path is known."""
    if explicit is not None:
        if not isinstance(explicit, str) or os.path.isabs(explicit) or os.path.exists(explicit) or \
                not _is_repo_id(explicit, allow_bare=True):
            raise ValueError(f"base_model={explicit!r} is not a Hub model id; pass the base's repo id, e.g. "
                             "'google-bert/bert-base-uncased'")
        return explicit
    if not recorded:
        warnings.warn("the adapter names no base model (base_model_name_or_path is empty): the card cannot link "
                      "it; pass base_model='namespace/name'", stacklevel=3)
        return None
    if not isinstance(recorded, str) or os.path.isabs(recorded) or os.path.exists(recorded) or \
            not _is_repo_id(recorded, allow_bare=True):
        warnings.warn(f"the adapter's base model {recorded!r} is a local path, not a Hub id: it is left out of the "
                      "card; pass base_model='namespace/name' to link the base on the Hub", stacklevel=3)
        return None
    return recorded


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
    path = folder / EXPORT_MARKER
    if not path.is_file():
        return None
    try:
        source = json.loads(path.read_bytes().decode("utf-8")).get("source_peft_type")
    except (ValueError, AttributeError):  # provenance only: a card without it is still right (push checks the JSON)
        return None
    return f"`{source}`" if source else None


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
    license: str = "apache-2.0",
    calibration: str | None = None,
    base_model: str | None = None,
    kind: str | None = None,
    report: NullSpaceReport | PathLike | dict[str, Any] | None = None,
    extra_tags: Iterable[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> CommitInfo:
    """Upload an adapter folder and its model card to `repo_id` in one commit; return the commit.

    Validation (arguments, repo id, every adapter file, card rendering) happens before the first request, so a
    refused push creates nothing. The repo is created if needed (`private` applies only then); `revision` is a
    branch, created from main if missing. `report` (a NullSpaceReport or its JSON) is uploaded as
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
    files = _checked_adapter_files(adapter_dir)
    card = render_card(adapter_dir, repo_id=repo_id, base_model=base_model, license=license,
                       calibration=calibration, extra_tags=extra_tags, kind=kind, report=report)
    generated = {CARD_FILE: str(card).encode("utf-8")}
    if report is not None:
        data = _nullspace_report(Path(adapter_dir), report)
        generated[NULLSPACE_REPORT] = (json.dumps(data, indent=2) + "\n").encode()
    title = CARD_KINDS[kind or adapter_kind(adapter_dir)].title

    api = HfApi(token=token)
    nothing = "nothing was committed"
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
