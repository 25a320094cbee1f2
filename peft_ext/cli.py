"""`peft-ext` command line: a thin layer over the library.

    peft-ext inspect ADAPTER                      # what an adapter is and how to load it (local dir or Hub id)
    peft-ext export-lora ADAPTER OUT [--base B]   # a peft-ext adapter as a plain LoRA adapter
    peft-ext lorax convert --adapter A --source-base S --target-base T --out OUT   # move a LoRA to another base
    peft-ext push ADAPTER_DIR REPO_ID [--revision R] [--private]   # upload an adapter + model card in one commit
    peft-ext card ADAPTER_DIR [--out README.md]   # render the model card only, for review
"""

from __future__ import annotations

import argparse
import json
import os

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


def read_adapter_config(adapter: str) -> dict:
    """adapter_config.json of a local directory or a Hub repo id (through huggingface_hub, HF_ENDPOINT aware)."""
    path = os.path.join(adapter, "adapter_config.json")
    if not os.path.isfile(path):
        if os.path.isdir(adapter):
            raise SystemExit(f"{adapter!r} has no adapter_config.json: not a PEFT adapter directory")
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(adapter, "adapter_config.json")
    with open(path) as f:
        return json.load(f)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .registry import missing_type_hint

    cfg = read_adapter_config(args.adapter)
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

    from . import export_to_lora  # importing peft_ext registers our types

    cfg = read_adapter_config(args.adapter)
    auto = getattr(peft, TASK_TO_PEFT_AUTO.get(cfg.get("task_type"), "AutoPeftModel"))
    if args.base:
        base_cls = auto._target_class
        if base_cls is None:
            from transformers import AutoModel as base_cls
        model = peft.PeftModel.from_pretrained(base_cls.from_pretrained(args.base), args.adapter)
    else:
        model = auto.from_pretrained(args.adapter)  # base from the adapter's base_model_name_or_path
    out = export_to_lora(model, args.out, adapter_name="default", overwrite=args.overwrite)
    print(f"wrote a plain LoRA adapter to {out}")
    return 0


def cmd_lorax_convert(args: argparse.Namespace) -> int:
    from .lorax import convert

    if args.push_to_hub:  # a bad repo id is refused before a whole conversion is spent
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(args.push_to_hub)
        except ValueError as e:
            raise SystemExit(f"peft-ext lorax convert: error: --push-to-hub={args.push_to_hub!r} is not a Hub repo id "
                             f"({e}); use namespace/name, e.g. me/style-lora-v2") from e
    options = dict(
        method=args.method, rank=args.rank, energy=args.energy, subspace_rank=args.subspace_rank,
        carry_complement=not args.no_carry_complement, min_similarity=args.min_similarity,
        on_low_similarity=args.on_low_similarity, allow_shape_mismatch=args.allow_shape_mismatch,
        drop_modules_to_save=args.drop_modules_to_save, force=args.force, cache_dir=args.cache_dir,
        cache=not args.no_cache, exact_max_dim=args.exact_max_dim, niter=args.niter, seed=args.seed, quiet=args.quiet,
    )
    try:
        report = convert(args.adapter, args.source_base, args.target_base, args.out, overwrite=args.overwrite,
                         **options)
    except (ValueError, TypeError, FileExistsError) as e:
        raise SystemExit(f"peft-ext lorax convert: error: {e}") from e
    if not args.quiet:
        print(report)
    print(f"wrote a LoRA adapter for {args.target_base} to {os.path.abspath(args.out)} (report: lorax_report.json)")
    if args.push_to_hub:
        from .hub import push_adapter

        try:
            info = push_adapter(args.out, args.push_to_hub)
        except (ValueError, TypeError) as e:
            raise SystemExit(f"peft-ext lorax convert: error: the adapter was written to {args.out}, but pushing it "
                             f"failed: {e}; push it later with `peft-ext push {args.out} {args.push_to_hub}`") from e
        print(f"pushed {args.out} to {args.push_to_hub}: {getattr(info, 'commit_url', None) or args.push_to_hub}")
    return 0


def add_lorax_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lorax", help="LoRA-X: move a trained LoRA adapter to another base model without training")
    lsub = p.add_subparsers(dest="lorax_command", required=True)
    c = lsub.add_parser("convert", help="transfer an adapter from --source-base to --target-base")
    c.add_argument("--adapter", required=True, help="plain LoRA adapter: directory or Hub repo id")
    c.add_argument("--source-base", required=True, help="base the adapter was trained on: directory or Hub repo id")
    c.add_argument("--target-base", required=True, help="base to move it to (same architecture): directory or repo id")
    c.add_argument("--out", required=True, help="output adapter directory")
    size = c.add_mutually_exclusive_group()
    size.add_argument("--rank", type=int, default=None, help="rank written per layer (default: the source rank)")
    size.add_argument("--energy", type=float, default=None,
                      help="instead of --rank: smallest rank keeping this share of ||dW_t||_F^2, e.g. 0.99")
    c.add_argument("--subspace-rank", type=int, default=64, help="k of the top-k SVD of each base weight (default 64)")
    c.add_argument("--no-carry-complement", action="store_true",
                   help="project onto the target's top subspace only (original LoRA-X) instead of also carrying "
                        "the part outside the source's top subspace")
    c.add_argument("--min-similarity", type=float, default=0.0,
                   help="layers with min(phi_U, phi_V) below this get --on-low-similarity (default 0: never)")
    c.add_argument("--on-low-similarity", choices=["keep", "drop", "copy"], default="keep")
    c.add_argument("--method", choices=["lorax", "copy", "delta-sigma"], default="lorax")
    c.add_argument("--cache-dir", default=None, help="SVD cache (default $HF_HOME/peft_ext/lorax_svd)")
    c.add_argument("--no-cache", action="store_true", help="neither read nor write the SVD cache")
    c.add_argument("--exact-max-dim", type=int, default=512, help="exact SVD up to this min(out, in), randomized above")
    c.add_argument("--niter", type=int, default=2, help="power iterations of the randomized SVD")
    c.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD")
    c.add_argument("--allow-shape-mismatch", action="store_true",
                   help="EXPERIMENTAL: align layers of different shapes by singular-vector index")
    c.add_argument("--drop-modules-to-save", action="store_true",
                   help="leave out modules_to_save / trained biases (not transferable) instead of refusing")
    c.add_argument("--force", action="store_true",
                   help="convert although the adapter's base_model_name_or_path is not --source-base")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    c.add_argument("--quiet", action="store_true", help="no progress bar and no report table")
    c.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="push the result with a model card")
    c.set_defaults(func=cmd_lorax_convert)


def _card_kwargs(args: argparse.Namespace) -> dict:
    return dict(base_model=args.base_model, license=args.license, calibration=args.calibration, kind=args.kind,
                report=args.report, extra_tags=args.tag)


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_adapter

    try:
        info = push_adapter(args.adapter_dir, args.repo_id, private=args.private, revision=args.revision,
                            commit_message=args.message, create_pr=args.create_pr, **_card_kwargs(args))
    except (ValueError, TypeError) as e:
        raise SystemExit(f"peft-ext push: error: {e}") from e
    print(f"pushed {args.adapter_dir} to {args.repo_id} ({args.revision or 'main'}): {info.commit_url}")
    if info.pr_url:
        print(f"pull request: {info.pr_url}")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from .hub import render_card

    try:
        card = render_card(args.adapter_dir, repo_id=args.repo_id, **_card_kwargs(args))
    except (ValueError, TypeError) as e:
        raise SystemExit(f"peft-ext card: error: {e}") from e
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(str(card))
        print(f"wrote the model card to {args.out}")
    else:
        print(card)
    return 0


def add_hub_parsers(sub: argparse._SubParsersAction) -> None:
    def card_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--base-model", default=None,
                       help="base model's Hub id for the card (default: the adapter's base_model_name_or_path)")
        p.add_argument("--license", default="apache-2.0", help="license in the card metadata (default apache-2.0)")
        p.add_argument("--calibration", default=None, help="one line on the calibration data, shown in the card")
        p.add_argument("--kind", default=None, help="card kind (default: detected): nullspace_lora, subspace_lora, "
                       "lora_export, lorax, lora")
        p.add_argument("--report", default=None, help="NullSpaceLoRA report JSON (report.save_json) to show/upload")
        p.add_argument("--tag", action="append", default=[], help="extra Hub tag (repeatable)")

    p = sub.add_parser("push", help="upload an adapter folder and its model card to the Hub in one commit")
    p.add_argument("adapter_dir", help="adapter directory (model.save_pretrained output)")
    p.add_argument("repo_id", help="Hub repo id, namespace/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its setting)")
    p.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    card_options(p)
    p.set_defaults(func=cmd_push)
    p = sub.add_parser("card", help="render an adapter's model card (README.md) without uploading")
    p.add_argument("adapter_dir", help="adapter directory")
    p.add_argument("--out", default=None, help="write the card here (default: print it)")
    p.add_argument("--repo-id", default=None, help="repo id used in the card's loading snippet")
    card_options(p)
    p.set_defaults(func=cmd_card)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peft-ext", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show an adapter's type and how to load it")
    p.add_argument("adapter", help="adapter directory or Hub repo id")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("export-lora", help="write a peft-ext adapter as a plain LoRA adapter")
    p.add_argument("adapter", help="adapter directory or Hub repo id")
    p.add_argument("out", help="output directory")
    p.add_argument("--base", default=None, help="base model (default: base_model_name_or_path of the adapter)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export_lora)
    add_lorax_parser(sub)
    add_hub_parsers(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
