"""Push and pull peft-ext adapters on the Hugging Face Hub, each with a model card for its kind.

    from peft_ext.hub import push_adapter, pull_adapter, render_card
    push_adapter("out/adapter", "me/bert-nullspace", report=report, calibration="2k tokens of Python docs")
    model = PeftModel.from_pretrained(base, "me/bert-nullspace", revision="<branch or sha>")  # no pull needed

Everything goes through `huggingface_hub` (so `HF_ENDPOINT`, `HF_TOKEN` and the cache settings apply). A push
validates the adapter folder before it touches the Hub and uploads every file in one commit, so the Hub never holds a
half-written adapter; the user's folder is never modified (the card is uploaded from memory).

Kinds of adapter and their cards (templates in `hub_cards/`): `nullspace_lora`, `subspace_lora` (our PEFT types),
`lorax` (a LoRA written by the LoRA-X converter: it has a `lorax_report.json`), `lora_export` (a LoRA exported from a
peft-ext adapter: `export_to_lora` writes a `peft_ext_export.json` marker next to it) and `lora` (any other LoRA).
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Union

from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    ModelCardData,
    snapshot_download,
)
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .export import EXPORT_MARKER
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
LORAX_LAYER_KEYS = ("name", "shape", "phi_u", "phi_v", "energy_kept", "rank", "action")
LORAX_SUMMARY_KEYS = ("layers", "transferred", "dropped", "copied", "mean_phi_u", "mean_phi_v", "energy_kept")


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
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-save the adapter with model.save_pretrained(folder)") from e
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        found = config.get("peft_type") if isinstance(config, dict) else config
        raise ValueError(f"{path} has peft_type={found!r}, expected a PEFT type name such as 'LORA'; re-save the "
                         "adapter with model.save_pretrained(folder)")
    return config


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

    Runs before anything touches the Hub, so a refused push leaves no repo and no commit behind.
    """
    config = read_adapter_config(adapter_dir)
    folder = Path(adapter_dir)
    files = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(
            f"adapter_dir={str(adapter_dir)!r} holds pickle files {pickles}: loading a pickle can run arbitrary code, "
            "so peft-ext does not upload them. Save the adapter with model.save_pretrained(folder, "
            f"safe_serialization=True) (the default) to get {WEIGHTS_FILE}, and remove {pickles[0]!r}"
        )
    if WEIGHTS_FILE not in files:
        raise ValueError(f"adapter_dir={str(adapter_dir)!r} has no {WEIGHTS_FILE}; save the adapter with "
                         "model.save_pretrained(folder, safe_serialization=True) (the default)")
    _check_safetensors(folder / WEIGHTS_FILE)
    _check_loadable(config, folder)
    return files


def _check_safetensors(path: Path) -> None:
    """Read the safetensors header only (8-byte length + JSON): catches truncated or foreign files cheaply."""
    fix = "re-save the adapter with model.save_pretrained(folder)"
    with open(path, "rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < size <= 100_000_000:
            raise ValueError(f"{path} is not a safetensors file (header length {size}); {fix}")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} has a corrupt safetensors header ({e}); {fix}") from e
    if not [k for k in header if k != "__metadata__"]:
        raise ValueError(f"{path} holds no tensors; {fix}")


def _check_loadable(config: dict[str, Any], folder: Path) -> None:
    """The PEFT type must be known to this process (ours are registered by importing peft_ext) and parse."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils.peft_types import PeftType

    peft_type = config["peft_type"]
    member = PeftType.__members__.get(peft_type)
    if member is None or member not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(f"{CONFIG_FILE} has peft_type={peft_type!r}, which PEFT cannot load in this process; "
                         + (missing_type_hint(peft_type) or "check the peft version the adapter was saved with"))
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[member]
    try:
        config_cls.from_pretrained(str(folder))
    except Exception as e:  # PEFT raises TypeError/ValueError from the dataclass and its __post_init__
        raise ValueError(f"{folder / CONFIG_FILE} does not load as {config_cls.__name__}: {e}; fix the field it "
                         "names or re-save the adapter with model.save_pretrained(folder)") from e


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
    kind = _check_kind(kind or adapter_kind(adapter_dir))
    spec = CARD_KINDS[kind]
    if repo_id is not None:
        _check_repo_id(repo_id)
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
    if kind not in CARD_KINDS:
        raise ValueError(f"kind={kind!r} is not a card kind; choose one of {', '.join(CARD_KINDS)}")
    return kind


def _base_model_id(explicit: str | None, recorded: str | None) -> str | None:
    """The base model's Hub id for the card metadata, or None when only a local path is known."""
    if explicit is not None:
        if os.path.isabs(explicit) or os.path.exists(explicit) or not _is_repo_id(explicit, allow_bare=True):
            raise ValueError(f"base_model={explicit!r} is not a Hub model id; pass the base's repo id, e.g. "
                             "'google-bert/bert-base-uncased'")
        return explicit
    if not recorded:
        warnings.warn("the adapter names no base model (base_model_name_or_path is empty): the card cannot link "
                      "it; pass base_model='namespace/name'", stacklevel=3)
        return None
    if os.path.isabs(recorded) or os.path.exists(recorded) or not _is_repo_id(recorded, allow_bare=True):
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
        data = json.loads(Path(report).read_text(encoding="utf-8"))
    else:
        raise TypeError(f"report must be a NullSpaceReport, a JSON path or a dict, got {type(report).__name__}")
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list):
        raise ValueError(f"{where} has no 'layers' list: not a NullSpaceReport (write it with report.save_json(path))")
    for i, layer in enumerate(layers):
        missing = [k for k in NULLSPACE_LAYER_KEYS if k not in layer]
        if missing:
            raise ValueError(f"{where}: layers[{i}] lacks {missing}; write the report with NullSpaceReport.save_json")
    return data


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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rerun the LoRA-X conversion") from e
    fix = "rerun the LoRA-X conversion to rewrite it"
    for key, kind in (("layers", list), ("summary", dict), ("source_base", str), ("target_base", str)):
        if not isinstance(data.get(key), kind):
            raise ValueError(f"{path}: field {key!r} is {data.get(key)!r}, expected a {kind.__name__}; {fix}")
    for i, layer in enumerate(data["layers"]):
        missing = [k for k in LORAX_LAYER_KEYS if k not in layer]
        if missing:
            raise ValueError(f"{path}: layers[{i}] lacks {missing}; {fix}")
    missing = [k for k in LORAX_SUMMARY_KEYS if k not in data["summary"]]
    if missing:
        raise ValueError(f"{path}: summary lacks {missing}; {fix}")
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
        source = json.loads(path.read_text(encoding="utf-8")).get("source_peft_type")
    except (json.JSONDecodeError, AttributeError):
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
) -> CommitInfo:
    """Upload an adapter folder and its model card to `repo_id` in one commit; return the commit.

    Validation (repo id, adapter files, card rendering) happens before the first request, so a refused push
    creates nothing. The repo is created if needed (`private` applies only then); `revision` is a branch, created
    from main if missing. `report` (a NullSpaceReport or its JSON) is uploaded as nullspace_report.json and shown in
    the card. Adapter files on the branch that this folder lacks (an old report, a stale `adapter_model.bin`) are
    deleted in the same commit. Load the result with `PeftModel.from_pretrained(base, repo_id, revision=...)`.
    """
    _check_repo_id(repo_id)
    _check_branch(revision)
    files = validate_adapter_dir(adapter_dir)
    card = render_card(adapter_dir, repo_id=repo_id, base_model=base_model, license=license,
                       calibration=calibration, extra_tags=extra_tags, kind=kind, report=report)
    generated = {CARD_FILE: str(card).encode("utf-8")}
    if report is not None:
        generated[NULLSPACE_REPORT] = (json.dumps(_nullspace_report(Path(adapter_dir), report), indent=2) + "\n").encode()

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    branch = revision or "main"
    if branch != "main":
        api.create_branch(repo_id, branch=branch, exist_ok=True)  # from main; an existing branch is kept as is
    head = api.repo_info(repo_id, revision=branch)
    uploads = set(files) | set(generated)
    stale = [s.rfilename for s in head.siblings or [] if s.rfilename in ADAPTER_FILES and s.rfilename not in uploads]
    folder = Path(adapter_dir)
    operations: list[Any] = [CommitOperationDelete(path_in_repo=p) for p in stale]
    operations += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p in files
                   if p not in generated]
    operations += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=data) for p, data in generated.items()]
    title = CARD_KINDS[kind or adapter_kind(adapter_dir)].title
    return api.create_commit(repo_id, operations, commit_message=commit_message or f"Upload {title} adapter (peft-ext)",
                             revision=branch, create_pr=create_pr, parent_commit=head.sha)


def _check_branch(revision: str | None) -> None:
    if revision is None:
        return
    if not isinstance(revision, str) or not revision.strip() or revision.startswith("refs/"):
        raise ValueError(f"revision={revision!r} must be a branch name such as 'v2' (created from main if missing)")
    if len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        raise ValueError(f"revision={revision!r} is a commit sha; a push needs a branch name (commits are immutable)")


def pull_adapter(repo_id: str, *, revision: str | None = None, local_dir: PathLike | None = None,
                 token: str | None = None) -> str:
    """Download an adapter repo's safe files (JSON, safetensors, README.md; never pickles); return the folder.

    Not needed to load an adapter: `PeftModel.from_pretrained(base, repo_id, revision=...)` downloads it itself.
    Useful to inspect it, convert it (`peft-ext export-lora`) or keep a copy (`local_dir`).
    """
    _check_repo_id(repo_id)
    path = snapshot_download(repo_id, revision=revision, local_dir=local_dir, token=token, allow_patterns=PULL_PATTERNS)
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise ValueError(f"{repo_id} at revision {revision or 'main'} has no {CONFIG_FILE}: not a PEFT adapter repo")
    return path
