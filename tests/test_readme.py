"""The README a newcomer follows: its links resolve, every sub-command has an example, the
default-run table is the one benchmarks/default_run.py prints."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from vitlab.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _outside_code(text: str) -> list[str]:
    lines, fenced = [], False
    for ln in text.splitlines():
        if ln.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(ln)
    return lines


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped (not '-' or '_'), spaces to '-'."""
    text = re.sub(r"`|\*\*|\*", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for ln in _outside_code(text):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", ln)
        if not m:
            continue
        base = github_anchor(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return out


def test_github_anchor_rules():
    assert github_anchor("The papers' experiments") == "the-papers-experiments"
    assert github_anchor("Training, fine-tuning, prediction") == "training-fine-tuning-prediction"
    assert github_anchor("Start-up") == "start-up"


def test_every_anchor_link_resolves():
    links = re.findall(r"\]\(#([^)\s]+)\)", "\n".join(_outside_code(README)))
    assert len(links) >= 8
    missing = sorted(set(links) - anchors(README))
    assert not missing, f"README links to missing headings: {missing}"


def test_every_local_file_link_exists():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", "\n".join(_outside_code(README)))
    local = [ln for ln in links if not re.match(r"[a-z]+://", ln)]
    assert local
    missing = [ln for ln in local if not (ROOT / ln).exists()]
    assert not missing, missing


def test_every_subcommand_has_an_example_in_a_code_block():
    action = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    code = "\n".join(_code_blocks(README))
    missing = [name for name in action.choices if not re.search(rf"\bvitlab {re.escape(name)}\b", code)]
    assert not missing, f"no `vitlab NAME` example in a README code block for: {missing}"


def test_readme_lists_what_a_run_directory_holds():
    for name in ("config.yaml", "train.log", "metrics.jsonl", "steps.jsonl", "summary.json", "curves.png"):
        assert f"`{name}`" in README, name


def test_default_run_table_is_the_one_the_script_prints():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import default_run
    finally:
        sys.path.pop(0)
    assert default_run.HEADER in README
    rows = README.split(default_run.HEADER, 1)[1].strip().split("\n\n", 1)[0].splitlines()
    assert len(rows) >= 2 and all(r.startswith("| ") and r.count("|") == default_run.HEADER.splitlines()[0].count("|")
                                  for r in rows)
    # each row names its CPU, and the current machine's kind is measured
    assert any("Zen 4, AVX-512 BF16, no AMX" in r for r in rows)
    for r in rows:  # CPU | threads | torch | final | best | training s | command s | date
        cells = [c.strip() for c in r.strip().strip("|").split("|")]
        assert re.fullmatch(r"\d+\.\d+%", cells[3]) and re.fullmatch(r"\d+\.\d+%", cells[4]), r
        assert float(cells[5]) > 0 and float(cells[6]) >= float(cells[5]), r
