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
