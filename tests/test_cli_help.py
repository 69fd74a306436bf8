"""Every ``deltaserve`` command's --help renders: help strings are %-formatted by argparse, so a bare
"%" in one (an engine option's "5% faster") used to crash --help of every command built from it."""

from __future__ import annotations

import argparse

from deltaserve.cli import build_parser


def _all_parsers(parser: argparse.ArgumentParser, path: str = "deltaserve"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, f"{path} {name}")


def test_every_help_renders_and_lists_every_engine_option():
    from dataclasses import fields

    from deltaserve.config import EngineConfig

    seen = {}
    for path, parser in _all_parsers(build_parser()):
        seen[path] = parser.format_help()  # raises on a bad format string
    for path in ("deltaserve serve", "deltaserve generate", "deltaserve bench offline"):
        text = seen[path]
        for f in fields(EngineConfig):
            if not f.metadata.get("positional"):
                assert "--" + f.name.replace("_", "-") in text, (path, f.name)
        assert "2-4% faster decode" in " ".join(text.split())  # the % survives, unescaped
    assert {"deltaserve bench ab", "deltaserve bench sweep", "deltaserve make-model"} <= set(seen)


def test_a_bad_option_or_model_is_one_line_naming_the_fix_not_a_traceback(capsys, tmp_path):
    """deltaserve's own errors (a bad option value, a missing model directory) reach the user as one
    `error:` line with exit status 2, as argparse's do, not as a traceback."""
    from deltaserve.cli import main

    missing = tmp_path / "no-such-model"
    assert main(["generate", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"deltaserve generate: error: model '{missing}': no such directory" in err
    assert "make-model" in err and "Traceback" not in err

    assert main(["generate", "--max-num-seqs", "0"]) == 2
    err = capsys.readouterr().err
    assert "max_num_seqs=0 is invalid: use a value >= 1" in err and "Traceback" not in err
