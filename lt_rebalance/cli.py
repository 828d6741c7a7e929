"""The ``ltr`` command line.

Commands are registered by name below (a method's command by its registry entry,
:mod:`lt_rebalance.registry`) and imported only when run, so ``ltr --help`` never loads torch or
timm. Each command lives in ``lt_rebalance/commands/<module>.py`` (or the extraction package) as a
thin wrapper over the library.
"""
from __future__ import annotations

import importlib

import click

from ._version import __version__
from .registry import method_commands

# name -> (module, attribute, one-line help shown by `ltr --help` without importing the module); the
# commands of methods come from the method registry
COMMANDS: dict[str, tuple[str, str, str]] = {
    **method_commands(),
    "info": ("lt_rebalance.commands.info", "info", "Summarise a feature file (instant: reads no features)."),
    "calibrate": ("lt_rebalance.commands.posthoc", "calibrate", "Temperature scaling on val; NLL and ECE before and after."),
    "export": ("lt_rebalance.commands.export", "export", "Write a timm checkpoint whose classifier is a re-balanced head."),
    "compare": ("lt_rebalance.commands.compare", "compare", "Run every method with defaults and print one table."),
    "check": ("lt_rebalance.commands.check", "check", "Verify a feature file in full (exit 1 on any problem)."),
    "import": ("lt_rebalance.commands.import_npz", "import_npz", "Create a feature file from arrays in an .npz file."),
    "extract": ("lt_rebalance.extract.cli", "extract", "Run a backbone once over a dataset and write the feature file."),
    "demo": ("lt_rebalance.commands.demo", "demo", "The whole pipeline on bundled digits images, offline, on a CPU."),
    "plot": ("lt_rebalance.commands.plot", "plot", "Figures: tau-curve, norms, per-class, compare (needs matplotlib)."),
    "report": ("lt_rebalance.commands.report", "report", "One self-contained HTML (or Markdown) page: tables, intervals, figures."),
    "text-head": ("lt_rebalance.commands.text_head", "text_head",
                  "Encode class-name prompts with an open_clip text tower into the feature file (needs [clip])."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use (click's LazyGroup recipe)."""

    def __init__(self, *args, lazy_commands: dict[str, tuple[str, str, str]], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy_commands])

    def get_command(self, ctx: click.Context, name: str):
        if name in self.lazy_commands:
            module, attr, _ = self.lazy_commands[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        from .commands.errors import interrupts_as_errors

        with interrupts_as_errors():  # Ctrl-C: one line and exit status 130
            return super().invoke(ctx)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, self.lazy_commands[name][2]) for name in sorted(self.lazy_commands)]
        if rows:
            width = max(len(name) for name, _ in rows)
            with formatter.section("Commands"):
                # one line per command whatever the terminal width (write_dl would wrap long summaries)
                for name, summary in rows:
                    formatter.write(f"{'':>{formatter.current_indent}}{name:<{width}}  {summary}\n")


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ltr")
def main() -> None:
    """lt-rebalance: extract backbone features once, re-balance the classifier in seconds.

    Every command takes --json (one JSON document on stdout) and writes progress to stderr.
    """


if __name__ == "__main__":  # pragma: no cover
    main()
