"""`peft-ext` command line: a thin layer over the library.

    peft-ext inspect ADAPTER                      # what an adapter is and how to load it (local dir or Hub id)
    peft-ext export-lora ADAPTER OUT [--base B]   # a peft-ext adapter as a plain LoRA adapter
    peft-ext lorax convert --adapter A --source-base S --target-base T --out OUT   # move a LoRA to another base
    peft-ext push ADAPTER_DIR REPO_ID [--revision R] [--private]   # upload an adapter + model card in one commit
    peft-ext card ADAPTER_DIR [--out README.md]   # render the model card only, for review
    peft-ext --version

A failure prints one line, `peft-ext: error: <what>, <which file/field/value>; <the fix>`, on stderr and exits with
status 1; a command line that cannot work as written (unknown option, bad option value, an option this input needs)
exits with status 2. `peft-ext --debug ...` (or `--debug` after the subcommand) also prints the traceback.

This module imports the standard library only (and peft_ext.lorax_options, a dataclass): torch, peft and
transformers are imported when a command runs, so `--help`, `--version` and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import re
import sys
import traceback
import types
import typing

from .lorax_options import TransferOptions

# PEFT task type -> the auto class its base model loads with
TASK_TO_PEFT_AUTO = {
    "CAUSAL_LM": "AutoPeftModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
    "SEQ_CLS": "AutoPeftModelForSequenceClassification",
    "TOKEN_CLS": "AutoPeftModelForTokenClassification",
    "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction",
    None: "AutoPeftModel",
}


class UsageError(ValueError):
    """The command line cannot work as written (exit status 2, as argparse's own errors): the fix is to change it."""


def _one_line(e: BaseException) -> str:
    # library messages (transformers, huggingface_hub) span several lines; the CLI promises one
    return " ".join(str(e).split()) or type(e).__name__


def _check_input(value: str, flag: str, fix: str = "check the path") -> None:
    """A positional/option that takes a directory or a Hub repo id: a path that is neither is refused here, because
    huggingface_hub would otherwise answer with "Repo id must be in the form ..." about a path the user typed."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if os.path.isdir(value):
        return
    if os.path.exists(value):
        raise ValueError(f"{flag}={value!r} is a file; pass the directory that holds it (or a Hub repo id)")
    try:
        validate_repo_id(value)
    except HFValidationError:
        raise FileNotFoundError(f"{flag}={value!r}: no such directory (and not a Hub repo id); {fix}") from None


def _check_safetensors(path: str) -> None:
    """The whole file against its header (safe_open checks that the header's offsets cover the file exactly): a
    truncated or padded file is named here instead of surfacing later as a SafetensorError that names no file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):
            pass
    except SafetensorError as e:
        raise ValueError(f"{path} is not a complete safetensors file ({e}); it was truncated or damaged, so re-save or "
                         "re-download it") from e


def _check_adapter_files(adapter: str) -> None:
    """A local adapter's weights, before any model is loaded (Hub adapters are checked by the library on download)."""
    if not os.path.isdir(adapter):
        return
    weights = os.path.join(adapter, "adapter_model.safetensors")
    if os.path.isfile(weights):
        _check_safetensors(weights)
    elif not os.path.isfile(os.path.join(adapter, "adapter_model.bin")):
        raise FileNotFoundError(f"{adapter!r} has adapter_config.json but no adapter_model.safetensors; re-save the "
                                "adapter with model.save_pretrained(folder)")


def _read_json(path: str) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-save or re-download it") from e


def _check_base_files(base: str, need_config: bool = False) -> None:
    """A local base model's config and safetensors weights (every shard of an index), before loading anything.
    `need_config`: the base is loaded with transformers (LoRA-X reads the weights only)."""
    if not os.path.isdir(base):
        return
    config = os.path.join(base, "config.json")
    if os.path.isfile(config):
        _read_json(config)
    elif need_config:  # transformers would look the directory up on huggingface.co and report a connection error
        raise FileNotFoundError(f"base model directory {base!r} has no config.json, so it is not a transformers model "
                                "folder; pass the folder written by model.save_pretrained(dir) or a Hub model id")
    index = os.path.join(base, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object; re-save the model with model.save_pretrained(dir)")
        shards = sorted(set(weight_map.values()))
    else:
        shards = ["model.safetensors"] if os.path.isfile(os.path.join(base, "model.safetensors")) else []
    for shard in shards:
        path = os.path.join(base, shard)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is listed in {index} but missing; re-download or re-save the model")
        _check_safetensors(path)


def _check_output(path: str, overwrite: bool, flag: str) -> None:
    """Refuse an existing output or one that cannot be created before any work is spent on it (a conversion or a
    model load can take minutes); the writers check again and write complete-or-absent."""
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{flag}={path!r} exists; pass --overwrite to replace it, or choose another path")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # the writers create missing parents: check the deepest one that exists
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"{flag}={path!r} cannot be created: {parent!r} is a file; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag}={path!r} cannot be created: {parent!r} is not writable by you; choose another "
                              "path or fix its permissions")


def read_adapter_config(adapter: str) -> dict:
    """adapter_config.json of a local directory or a Hub repo id (through huggingface_hub, HF_ENDPOINT aware),
    validated (JSON object with a peft_type) with errors that name the directory or repo and the fix."""
    if not os.path.isdir(adapter):
        _check_input(adapter, "adapter")  # before importing the library: a mistyped path fails in a blink
    from .hub import read_adapter_config as read  # the one reader (local folder or Hub id)

    return read(adapter)


def cmd_inspect(args: argparse.Namespace) -> int:
    cfg = read_adapter_config(args.adapter)
    from .registry import missing_type_hint  # imports torch and peft: after the cheap checks of the input

    peft_type = cfg.get("peft_type")
    print(f"peft_type:  {peft_type}")
    for key in ("base_model_name_or_path", "task_type", "r", "mode", "target_modules"):
        if cfg.get(key) is not None:
            print(f"{key + ':':<11} {cfg[key]}")
    hint = missing_type_hint(peft_type or "")
    print("load with:  " + (hint or "peft.PeftModel.from_pretrained(base, adapter) — a type vanilla PEFT knows"))
    return 0


def cmd_export_lora(args: argparse.Namespace) -> int:
    import peft

    from .export import export_to_lora
    from .lorax import EXPORTABLE_TYPES

    _check_output(args.out, args.overwrite, "out")
    cfg = read_adapter_config(args.adapter)
    local = os.path.isdir(args.adapter)
    where = os.path.join(args.adapter, "adapter_config.json") if local else f"Hub repo {args.adapter}"
    if cfg["peft_type"] not in EXPORTABLE_TYPES:  # refused before minutes are spent loading the base
        fix = {"LORA": "it already is a plain LoRA adapter: load it with peft.PeftModel.from_pretrained(base, adapter)",
               "ORTHO_SPLIT": "OrthoSplit is a sparse stream, not a low-rank update: use "
                              "peft_ext.set_ortho_alpha(model, a), then model.merge_and_unload() for plain weights"}
        raise ValueError(f"{where} has peft_type={cfg['peft_type']!r}, which export-lora does not convert; "
                         + fix.get(cfg["peft_type"], f"it converts {' and '.join(EXPORTABLE_TYPES)} adapters"))
    fix = "pass the model the adapter was trained on with --base DIR_OR_REPO_ID"
    base = args.base or cfg.get("base_model_name_or_path")
    if not base:  # PEFT would try to download `None` from huggingface.co and never mention --base
        raise UsageError(f"{where} names no base model (base_model_name_or_path is empty); {fix}")
    _check_input(base, "--base" if args.base else "base_model_name_or_path",
                 "check the path" if args.base else f"it is recorded in {where}: {fix}")
    _check_base_files(base, need_config=True)
    _check_adapter_files(args.adapter)
    named = f"--base={base!r}" if args.base else f"{base!r} (base_model_name_or_path in {where})"
    auto = getattr(peft, TASK_TO_PEFT_AUTO.get(cfg.get("task_type"), "AutoPeftModel"))
    try:
        if args.base:
            base_cls = auto._target_class
            if base_cls is None:
                from transformers import AutoModel as base_cls
            model = peft.PeftModel.from_pretrained(base_cls.from_pretrained(args.base), args.adapter)
        else:
            model = auto.from_pretrained(args.adapter)  # base from the adapter's base_model_name_or_path
    except OSError as e:
        from huggingface_hub.errors import HfHubHTTPError

        # transformers reports a base it cannot find or read as a bare OSError (no errno) that names neither --base
        # nor a fix; errno errors and Hub HTTP errors name their file or URL and get the generic line
        if e.errno is not None or isinstance(e, HfHubHTTPError):
            raise
        raise ValueError(f"cannot load the base model {named}: {_one_line(e)}; {fix}") from e
    except (ValueError, RuntimeError) as e:
        # An adapter that does not fit the base (shapes, target modules it lacks) is reported by PEFT, our layers or
        # torch's load_state_dict (a RuntimeError, one line per tensor) without naming the base or --base.
        mismatch = [line.strip().rstrip(".") for line in str(e).splitlines()
                    if line.strip().startswith("size mismatch")]
        if isinstance(e, RuntimeError) and not mismatch:
            raise
        detail = f"{len(mismatch)} tensors differ in shape, e.g. {mismatch[0]}" if mismatch else _one_line(e)
        raise ValueError(f"the adapter {args.adapter!r} does not load onto the base model {named}: {detail}; if that "
                         f"is not the model it was trained on, {fix}") from e
    out = export_to_lora(model, args.out, adapter_name="default", overwrite=args.overwrite)
    print(f"wrote a plain LoRA adapter to {out}")
    return 0


def _write_plot(draw: typing.Callable[[str], str], path: str) -> bool:
    """`draw(path)` (a report's `.plot`) beside the report JSON; without matplotlib one line on stderr instead: the
    picture is an extra, the command's result is already written."""
    try:
        draw(path)
    except ImportError as e:
        print(f"peft-ext: no {os.path.basename(path)}: {e}", file=sys.stderr)
        return False
    return True


def cmd_lorax_convert(args: argparse.Namespace) -> int:
    from .hub import _check_repo_id
    from .lorax import convert

    if args.push_to_hub:  # a bad repo id is refused before a whole conversion is spent
        try:
            _check_repo_id(args.push_to_hub)
        except ValueError as e:
            raise UsageError(str(e).replace("repo_id=", "--push-to-hub=", 1)) from e
    options = {name: getattr(args, name) for name in LORAX_FLAGS}
    options["progress"] = args.progress and not args.quiet
    try:  # option values are checked by the library's dataclass; the message gets the flag names the user typed
        TransferOptions(**options)
    except (ValueError, TypeError) as e:
        flags = {k: flag for k, flag in LORAX_FLAGS.items() if not flag.startswith("--no-")}
        raise UsageError(re.sub(r"\b(" + "|".join(flags) + r")=", lambda m: flags[m.group(1)] + "=", str(e))) from e
    _check_output(args.out, args.overwrite, "--out")
    for flag, value in (("--adapter", args.adapter), ("--source-base", args.source_base),
                        ("--target-base", args.target_base)):
        _check_input(value, flag)
    if os.path.isdir(args.adapter):  # the library's json.load and load_file name no file when these are damaged
        read_adapter_config(args.adapter)
        _check_adapter_files(args.adapter)
    _check_base_files(args.source_base)
    _check_base_files(args.target_base)
    report = convert(args.adapter, args.source_base, args.target_base, args.out, overwrite=args.overwrite, **options)
    if not args.quiet:
        print(report)
    pictured = _write_plot(report.plot, os.path.join(args.out, "lorax_report.png"))
    print(f"wrote a LoRA adapter for {args.target_base} to {os.path.abspath(args.out)} (report: lorax_report.json"
          + (", lorax_report.png" if pictured else "") + ")")
    if args.push_to_hub:
        from .hub import push_adapter

        try:
            info = push_adapter(args.out, args.push_to_hub)
        except Exception as e:  # one line that says the conversion is not lost, whatever the push failed on
            reason = _explain(e)[1].removeprefix("error: ")
            raise ValueError(f"the adapter was written to {args.out}, but pushing it failed: {reason}; push it later "
                             f"with `peft-ext push {args.out} {args.push_to_hub}`") from e
        print(f"pushed {args.out} to {args.push_to_hub}: {getattr(info, 'commit_url', None) or args.push_to_hub}")
    return 0


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type) -> dict[str, str]:
    """One option per field of the dataclass `cls`, as transformers.HfArgumentParser writes them (without importing
    transformers): `--a-b` and `--a_b`, Literal -> choices, Optional[X] -> X, a bool defaulting to False -> a flag, one
    defaulting to True -> `--no-a-b`; help from `metadata["help"]`. A field with `metadata["cli"] = False` is left
    out. Returns {field name: its option} for error messages."""
    hints = typing.get_type_hints(cls)
    flags = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        typ, help_text = hints[f.name], f.metadata.get("help")
        if typing.get_origin(typ) in (typing.Union, types.UnionType):
            typ = next(a for a in typing.get_args(typ) if a is not type(None))  # Optional[X]: X, default None

        def names(name: str) -> list[str]:
            return [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])

        if typ is bool and f.default is True:
            option = names(f"no_{f.name}")
            parser.add_argument(*option, dest=f.name, action="store_false", default=True,
                                help=help_text and f"{help_text} (on by default: this turns it off)")
        elif typ is bool:
            option = names(f.name)
            parser.add_argument(*option, dest=f.name, action="store_true", help=help_text)
        else:
            option = names(f.name)
            kind = {"choices": typing.get_args(typ)} if typing.get_origin(typ) is typing.Literal else {"type": typ}
            default = "" if f.default is None else f" (default {f.default})"
            parser.add_argument(*option, dest=f.name, default=f.default, **kind, help=help_text and help_text + default)
        flags[f.name] = option[0]
    return flags


LORAX_FLAGS = add_dataclass_options(argparse.ArgumentParser(add_help=False), TransferOptions)


def add_lorax_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lorax", help="LoRA-X: move a trained LoRA adapter to another base model without training")
    lsub = p.add_subparsers(dest="lorax_command", required=True)
    c = lsub.add_parser("convert", help="transfer an adapter from --source-base to --target-base")
    c.add_argument("--adapter", required=True, help="plain LoRA adapter: directory or Hub repo id")
    c.add_argument("--source-base", required=True, help="base the adapter was trained on: directory or Hub repo id")
    c.add_argument("--target-base", required=True, help="base to move it to (same architecture): directory or repo id")
    c.add_argument("--out", required=True, help="output adapter directory")
    add_dataclass_options(c, TransferOptions)
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    c.add_argument("--quiet", action="store_true", help="--no-progress, and no report table either (the report is "
                   "still written to --out)")
    c.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="push the result with a model card")
    c.set_defaults(func=cmd_lorax_convert)


def _card_kwargs(args: argparse.Namespace) -> dict:
    return dict(base_model=args.base_model, license=args.license, calibration=args.calibration, kind=args.kind,
                report=args.report, extra_tags=args.tag)


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import _check_branch, _check_repo_id, push_adapter

    try:  # the library checks these too; here a bad value is a usage error (exit status 2)
        _check_repo_id(args.repo_id)
        _check_branch(args.revision)
    except ValueError as e:
        raise UsageError(str(e).replace("repo_id=", "REPO_ID=", 1).replace("revision=", "--revision=", 1)) from e
    weights = os.path.join(args.adapter_dir, "adapter_model.safetensors")
    if os.path.isfile(weights):  # the library reads only the header: a truncated file would be uploaded
        _check_safetensors(weights)
    info = push_adapter(args.adapter_dir, args.repo_id, private=args.private, revision=args.revision,
                        commit_message=args.message, create_pr=args.create_pr, check_base=not args.no_check_base,
                        **_card_kwargs(args))
    print(f"pushed {args.adapter_dir} to {args.repo_id} ({args.revision or 'main'}): {info.commit_url}")
    if info.pr_url:
        print(f"pull request: {info.pr_url}")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from .hub import render_card

    if args.out:  # e.g. the folder's own README.md (PEFT's or TRL's card) is replaced only when asked
        _check_output(args.out, args.overwrite, "--out")
    card = render_card(args.adapter_dir, repo_id=args.repo_id, **_card_kwargs(args))
    if args.out:  # complete or absent: a kill mid-write must not truncate the folder's README.md
        from .files import atomic_file

        with atomic_file(args.out, field="--out") as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(str(card))
        print(f"wrote the model card to {args.out}")
    else:
        print(card)
    return 0


def add_hub_parsers(sub: argparse._SubParsersAction) -> None:
    def card_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--base-model", default=None,
                       help="base model's Hub id, for the card and the pushed adapter_config.json (default: the "
                            "adapter's base_model_name_or_path; a push refuses a local path there)")
        p.add_argument("--license", default=None,
                       help="license id in the card metadata, e.g. apache-2.0 (default: the license the adapter "
                            "folder's README.md or the base model's card names; refused when none does)")
        p.add_argument("--calibration", default=None, help="one line on the calibration data, shown in the card")
        p.add_argument("--kind", default=None, help="card kind (default: detected): nullspace_lora, subspace_lora, "
                       "lora_export, lorax, lora")
        p.add_argument("--report", default=None, help="NullSpaceLoRA report JSON (report.save_json) to show/upload")
        p.add_argument("--tag", action="append", default=[], help="extra Hub tag (repeatable)")

    p = sub.add_parser("push", help="upload an adapter folder and its model card to the Hub in one commit")
    p.add_argument("adapter_dir", help="adapter directory (model.save_pretrained or trainer.save_model output, or a "
                   "Trainer checkpoint: its training state and pickles are not uploaded)")
    p.add_argument("repo_id", help="Hub repo id, namespace/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its setting)")
    p.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--no-check-base", action="store_true",
                   help="do not look the base model up on the server pushed to (a base on another server, or a "
                        "private repo this token cannot see); its license then comes from --license or local cards")
    card_options(p)
    p.set_defaults(func=cmd_push)
    p = sub.add_parser("card", help="render an adapter's model card (README.md) without uploading")
    p.add_argument("adapter_dir", help="adapter directory")
    p.add_argument("--out", default=None, help="write the card here (default: print it)")
    p.add_argument("--repo-id", default=None, help="repo id used in the card's loading snippet")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    card_options(p)
    p.set_defaults(func=cmd_card)


_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.EACCES: "choose a location you can read/write, or fix its permissions",
    errno.EPERM: "choose a location you can read/write, or fix its permissions",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.EISDIR: "it is a directory; pass a file path",
    errno.EEXIST: "remove it or choose another path",
    errno.ENOSPC: "free some disk space or choose another disk, then rerun",
    errno.EROFS: "the file system is read-only; choose a writable location",
}


def _explain(e: Exception) -> tuple[int, str]:
    """(exit status, the text after `peft-ext: `) for an exception a command raised. Expected failures (bad input,
    files, the Hub) name what failed and the fix; any other exception is a bug in peft-ext and says so."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    from safetensors import SafetensorError

    text = _one_line(e)
    if isinstance(e, UsageError):
        return 2, f"error: {text}"
    if isinstance(e, HfHubHTTPError):  # its own message is several lines of boilerplate around one server sentence
        response = e.response
        status = getattr(response, "status_code", None)
        url = getattr(response, "url", None) or constants.ENDPOINT
        said = getattr(e, "server_message", None) or text.split(" for url")[0]
        fix = {401: "no valid token was sent: run `hf auth login` or set HF_TOKEN to a token with write access",
               403: "your token lacks access: use a token with write access to this repo or namespace, or push to "
                    "your own namespace",
               404: "check the repo id (and --revision); if the repo is private or gated, log in with `hf auth login` "
                    "or set HF_TOKEN"}.get(status, "retry later; if it persists check the repo id and HF_ENDPOINT")
        return 1, f"error: the Hub refused {url} (HTTP {status}: {' '.join(str(said).split())}); {fix}"
    if isinstance(e, OfflineModeIsEnabled):  # "Cannot reach <url>: offline mode is enabled ... unset HF_HUB_OFFLINE"
        return 1, f"error: {text}"
    if isinstance(e, LocalEntryNotFoundError):
        return 1, f"error: {text}; pass a local directory, or unset HF_HUB_OFFLINE and check the network"
    # huggingface_hub's HTTP client (requests, httpx, httpx2 across versions) has a TransportError family for
    # refused connections and timeouts; matched by name so the CLI does not import a particular client
    if any(c.__name__ in ("TransportError", "ConnectionError", "Timeout") for c in type(e).__mro__):
        return 1, (f"error: cannot reach the Hub at {constants.ENDPOINT} ({type(e).__name__}: {text}); check the "
                   "network and HF_ENDPOINT, then rerun")
    if isinstance(e, OSError) and e.filename is not None:  # "[Errno 13] Permission denied: 'x'" names no fix
        where = repr(e.filename) + (f" -> {e.filename2!r}" if e.filename2 is not None else "")
        return 1, f"error: {e.strerror or text}: {where}; {_OS_FIXES.get(e.errno, 'check the path and rerun')}"
    if isinstance(e, json.JSONDecodeError):  # reached only where no check of ours read the file first
        return 1, f"error: a JSON file is invalid ({text}); rerun with --debug to see which, then re-save it"
    if isinstance(e, SafetensorError):  # likewise: safetensors names no file
        return 1, f"error: a safetensors file is damaged ({text}); rerun with --debug to see which, then re-save it"
    if isinstance(e, (ValueError, TypeError, OSError)):  # our library's messages name field, value and fix
        return 1, f"error: {text}"
    return 1, (f"internal error: {type(e).__name__}: {text}; this is a bug in peft-ext, not in your input: rerun "
               "with --debug and report the command and the traceback")


class _NoKernelsPackage:
    """Drops one log record: bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community: No module
    named 'kernels'", logged when it is imported (peft imports it whenever it is installed) on a CPU with
    AVX-512-BF16. It says only that the optional `kernels` package is absent; bitsandbytes then uses its own CPU
    kernel, and no command here runs a 4-bit matmul. Any other failure to load that kernel is still shown."""

    @staticmethod
    def filter(record: object) -> bool:
        message = record.getMessage()  # type: ignore[attr-defined]
        return not ("gemm_4bit_forward from kernels-community" in message and "No module named 'kernels'" in message)


def _hide_optional_kernel_notice() -> None:
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsPackage.filter)


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error of every other failure; usage errors keep argparse's exit status 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"peft-ext: error: {message}; see `{self.prog} --help`\n")


def _add_debug(parser: argparse.ArgumentParser, default: object) -> None:
    """--debug before the subcommand (default False) and after it (SUPPRESS: unset unless given, so it does not
    overwrite the global one): users append it to the failed command line, as the error hint suggests."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on failure, also print the traceback (for bug reports)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_debug(child, argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="peft-ext", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"peft-ext {__version__}",
                        help="print the installed version of peft-ext and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show an adapter's type and how to load it")
    p.add_argument("adapter", help="adapter directory or Hub repo id")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("export-lora", help="write a peft-ext adapter as a plain LoRA adapter")
    p.add_argument("adapter", help="adapter directory or Hub repo id")
    p.add_argument("out", help="output directory")
    p.add_argument("--base", default=None, help="base model (default: base_model_name_or_path of the adapter)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing out directory")
    p.set_defaults(func=cmd_export_lora)
    add_lorax_parser(sub)
    add_hub_parsers(sub)
    _add_debug(parser, False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `peft-ext`; return the exit status (0, 1 failure, 2 usage error) after printing any error as one line."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a usage error _Parser.error has already printed (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        _hide_optional_kernel_notice()
        from . import _ensure_api

        _ensure_api()  # what `import peft_ext` does outside this process: torch, peft, our types registered
        return args.func(args)
    except Exception as e:  # KeyboardInterrupt and SystemExit are not failures of the command: they pass
        status, line = _explain(e)
        if args.debug:
            traceback.print_exc()
        print(f"peft-ext: {line}", file=sys.stderr)
        return status


if __name__ == "__main__":
    raise SystemExit(main())
