"""Fine-tune a causal LM on TOFU-style fictitious people at a realistic rate: the model to unlearn from, and the oracle.

    python recipes/tofu_finetune.py                                                   # SmolLM2-135M, both models
    python recipes/tofu_finetune.py --config recipes/presets/tofu_finetune_quick.yaml # a tiny Llama, seconds (tests)

The fine-tune itself (what it trains, how it is cached and reported, and what it costs) is recipes/tofu_models.py's:
this recipe parses the flags (tofu_models.FinetuneArgs) and builds the models it names.
"""

from __future__ import annotations

from typing import Optional

from tofu_models import FinetuneArgs as Args
from tofu_models import build


def parse_args(argv: Optional[list[str]] = None) -> Args:
    from common import parse_with_preset

    parser, args = parse_with_preset(Args, argv)
    bad = [w for w in args.which if w not in ("full", "oracle")]
    if bad or not args.which:
        parser.error(f"--which got {bad or args.which}: choose from full, oracle")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    return args


def write_report(args: Args, report: dict) -> str:
    """The model's report, with the settings that made it, complete-or-absent under --results_dir."""
    import json
    import os

    from peft_ext.files import atomic_file
    from tofu_models import settings

    path = os.path.join(args.results_dir, f"{report['which']}-{report['settings_key']}.json")
    os.makedirs(args.results_dir, exist_ok=True)
    row = {**{k: v for k, v in report.items() if k != "folder"}, "settings": settings(args)}
    with atomic_file(path, field="results_dir") as tmp, open(tmp, "w") as f:
        json.dump(row, f, indent=1)
    return path


def main(argv: Optional[list[str]] = None) -> dict:
    from common import recipe_runtime

    args = parse_args(argv)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    out = {}
    with recipe_runtime(args.threads):
        for which in args.which:
            r = build(args, which, log)
            delta = ", ".join(f"{k} {v:.4f}" for k, v in r["relative_delta"].items())
            log(f"{which}: forget PPL {r['forget_ppl']:.3f}, retain-eval PPL {r['retain_ppl']:.3f}, "
                f"{r['train']['steps']} steps in {r['train']['seconds']} s; ||dW||/||W||: {delta}")
            out[which] = r
            if args.results_dir:
                write_report(args, r)
    return out


if __name__ == "__main__":
    main()
