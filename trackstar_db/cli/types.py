"""The click types of the CLI's options, built from the library's rules (option_checks.py).

`click_type(rule)` applies a rule before anything runs, in the library's words; cli/common.Group
prints the refusal with the flag in one line ("--k must be >= 1, not 0"). A Choice becomes
click.Choice, so the help lists its values. tests/test_options.py checks that every option with
a counterpart field in a verb's options dataclass carries that field's rule.
"""

from __future__ import annotations

from pathlib import Path

import click

from trackstar_db import devices, option_checks as rules
from trackstar_db.errors import TrackstarError


class Ruled(click.ParamType):
    """An option `rule` checks, refused in the library's words."""

    def __init__(self, rule):
        self.rule = rule
        integer = isinstance(rule, rules.Range) and rule.integer
        self.name = "integer" if integer else "number" if isinstance(rule, rules.Range) else "name"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and isinstance(self.rule, rules.Range):
            try:
                value = int(value.strip()) if self.rule.integer else float(value)
            except ValueError:
                self.fail(f"must be {'an integer' if self.rule.integer else 'a number'}, not {value!r}", param, ctx)
        problem = self.rule.problem(value)
        if problem:
            self.fail(problem, param, ctx)
        return value


class Output(click.Path):
    """A file or folder to write, never inside a database directory."""

    def convert(self, value, param, ctx):
        path = super().convert(value, param, ctx)
        try:
            return rules.outside_database(f"--{param.name.replace('_', '-')}" if param else "output", path)
        except TrackstarError as exc:
            self.fail(str(exc).partition(": ")[2], param, ctx)


def click_type(rule) -> click.ParamType:
    """The click type of an option `rule` checks."""
    if isinstance(rule, rules.Choice):
        return click.Choice(list(rule.values))
    return Ruled(rule)


POSITIVE = click_type(rules.COUNT)
NON_NEGATIVE = click_type(rules.NON_NEGATIVE)
TOP_K = click_type(rules.K)
NAME = click_type(rules.RUN_NAME)
POSITIVE_FLOAT = click_type(rules.POSITIVE_NUMBER)
FRACTION = click_type(rules.FRACTION)
PROPER_FRACTION = click_type(rules.PROPER_FRACTION)
DAMPING = click_type(rules.DAMPING)
DEVICE = click_type(devices.DEVICE)
OUTPUT_FILE = Output(dir_okay=False, path_type=Path)
OUTPUT_DIR = Output(file_okay=False, path_type=Path)
