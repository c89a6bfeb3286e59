"""The command line a newcomer meets: --version, help texts with defaults, the option table,
the lines a terminal shows, and start-up that does not import torch."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from vitlab.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    return env


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version_prints_the_package_version():
    out = subprocess.run([sys.executable, "-m", "vitlab", "--version"], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert out.stdout.strip() == f"vitlab {project['version']}"


def test_every_option_has_help_that_names_its_default():
    missing = []
    subs = _subparsers(build_parser())
    assert {"train", "eval", "finetune", "predict", "analyze", "fewshot", "pretrain", "study", "models",
            "bench"} <= set(subs)
    for name, sub in subs.items():
        fmt = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            what = f"vitlab {name} {'/'.join(action.option_strings) or action.dest}"
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{what}: no help")
                continue
            if not action.option_strings:  # a positional: its help is what it is, no default
                continue
            text = fmt._expand_help(action)
            if "default" not in text:
                missing.append(f"{what}: help does not say its default: {text!r}")
            elif action.default not in (None, False) and action.nargs != 0 and str(action.default) not in text:
                missing.append(f"{what}: help does not name its default {action.default!r}: {text!r}")
    assert not missing, "\n".join(missing)


def test_finetune_help_names_the_finetune_defaults():
    from vitlab.train.api import FINETUNE_DEFAULTS

    sub = _subparsers(build_parser())["finetune"]
    text = {a.dest: a.help for a in sub._actions}
    for key in ("epochs", "batch_size", "lr", "optimizer"):
        assert f"default: {FINETUNE_DEFAULTS[key]}" in text[key], key


def test_bench_choices_match_the_benchmark():
    import vitlab.bench as bench
    import vitlab.bench_cli as bench_cli

    assert tuple(bench_cli.MODES) == tuple(bench.MODES)
    assert tuple(bench_cli.DTYPES) == tuple(bench.DTYPES)
    assert bench.register is bench_cli.register


@pytest.mark.parametrize("columns", [200, 80])
def test_train_option_table_columns_line_up(columns, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(columns))
    text = _subparsers(build_parser())["train"].format_help()
    table = text.split("lists as [a,b]):", 1)[1].strip("\n").splitlines()
    rows = [ln for ln in table if not ln.startswith("   ")]
    names = [ln.split()[0] for ln in rows]
    assert "randaugment" in names and "objective" in names and len(rows) > 40
    starts = {ln.index(" default ") for ln in rows}
    assert len(starts) == 1, [ln for ln in rows if ln.index(" default ") != min(starts)]
    assert all(len(ln) < columns for ln in table), [ln for ln in table if len(ln) >= columns]
    if columns == 200:  # wide: the help column starts at the same place on every row
        from vitlab.train.config import describe_fields

        by_name = {ln.split()[0]: ln for ln in rows}
        helps = {by_name[name].find(help_[:12]) for name, _, _, help_ in describe_fields() if help_}
        assert len(helps) == 1 and -1 not in helps, helps
    else:  # narrow: each help on its own indented lines under its row
        assert table[table.index(next(r for r in rows if r.split()[0] == "randaugment")) + 1].strip() == \
            "RandAugment [N, M], e.g. [2, 9]"


def test_cli_parser_does_not_import_heavy_libraries():
    code = ("import sys, vitlab.cli\n"
            "p = vitlab.cli.build_parser(); p.format_help()\n"
            "sub = [a for a in p._actions if a.__class__.__name__ == '_SubParsersAction'][0]\n"
            "sub.choices['train'].format_help(); sub.choices['bench'].format_help()\n"
            "print([m for m in ('torch', 'matplotlib', 'transformers', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_models_listing_is_cached_and_read_back_without_torch(tmp_path):
    code = ("import sys\nfrom vitlab.cli import main\nrc = main(['models', '--family', 'cvt'])\n"
            "print('torch imported:', 'torch' in sys.modules)\nsys.exit(rc)")
    env = _env(VITLAB_CACHE_DIR=str(tmp_path), COLUMNS="200")
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    assert "torch imported: True" in first.stdout  # the first listing builds the models
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert second.returncode == 0, second.stderr
    assert "torch imported: False" in second.stdout
    table = second.stdout.split("torch imported")[0]
    assert table == first.stdout.split("torch imported")[0]
    assert "cvt_13" in table and "20.0" in table and "vit_b16" not in table
    cached = json.loads(next(tmp_path.glob("models-*.json")).read_text())
    assert cached["cvt_13"]["family"] == "cvt" and "ViT-B/16" in cached["vit_b16"]["aliases"]


def test_models_unknown_family_names_the_families(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vitlab", "models", "--family", "vitt"], capture_output=True,
                         text=True, env=_env(VITLAB_CACHE_DIR=str(tmp_path)), cwd=ROOT, timeout=300)
    assert out.returncode == 2
    assert "no family 'vitt'; choose one of:" in out.stderr and "convmixer" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("n,expected", [(1, "1 epoch"), (2, "2 epochs"), (0, "0 epochs")])
def test_plural(n, expected):
    from vitlab.train.runlog import plural

    assert plural(n, "epoch") == expected


def test_long_log_lines_break_at_separators_within_the_terminal(tmp_path, monkeypatch, capsys):
    from vitlab.train import runlog

    line = ("epoch 30/30 step 780 | lr 1.00e-05 | train_loss 0.0123 | val_loss 0.0800 | val_acc 97.21% "
            "| 12,345 img/s")
    monkeypatch.setattr(runlog, "terminal_width", lambda: 80)
    log = runlog.RunLog(tmp_path, enabled=True, tensorboard=False)
    log.line(line)
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) == 2 and all(len(s) <= 80 for s in shown)
    assert shown[1].startswith("    ") and " | ".join(s.strip() for s in shown) == line
    # the log file keeps one record per line
    assert (tmp_path / "train.log").read_text().splitlines()[0].endswith(line)
    # not a terminal: unchanged
    monkeypatch.setattr(runlog, "terminal_width", lambda: None)
    log.line(line)
    assert capsys.readouterr().out.strip() == line
    assert runlog.fit_width("no separators but " + "word " * 30, 40).count("\n") >= 3
