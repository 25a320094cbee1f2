"""The README's generated blocks are what the committed results generate (scripts/update_readme.py): a typed or
stale number fails CI."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import update_readme  # noqa: E402


def test_readme_blocks_match_committed_results(capsys):
    assert update_readme.main(["--check"]) == 0, capsys.readouterr().out


def test_check_catches_a_typed_number(tmp_path, capsys):
    text = (ROOT / "README.md").read_text()
    block = update_readme._block(text, "directional")
    assert block, "the directional block is committed and must be checked"
    stale = tmp_path / "README.md"
    stale.write_text(text.replace(block, block.replace("|", "| 9", 1), 1))
    assert update_readme.main(["--check"], readme=stale) == 1
    assert "directional" in capsys.readouterr().out
    assert update_readme.main([], readme=stale) == 0  # regenerating repairs it, written whole
    assert stale.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temporary left beside it


def test_missing_markers_are_named(tmp_path, capsys):
    stale = tmp_path / "README.md"
    stale.write_text((ROOT / "README.md").read_text().replace("<!-- directional:begin -->", ""))
    assert update_readme.main([], readme=stale) == 1
    assert "directional: markers not found" in capsys.readouterr().err
