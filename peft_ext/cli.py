"""`peft-ext` command line: a thin layer over the library.

    peft-ext inspect ADAPTER                      # what an adapter is and how to load it (local dir or Hub id)
    peft-ext export-lora ADAPTER OUT [--base B]   # a peft-ext adapter as a plain LoRA adapter
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
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
