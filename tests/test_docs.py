"""The docs stay true: the CLI reference matches the commands' own help, and the guide's commands exist."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_reference", DOCS / "gen_cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_in_sync_with_the_help():
    expected = _generator().render()
    actual = (DOCS / "cli-reference.md").read_text()
    assert actual == expected, "docs/cli-reference.md is stale: run `python docs/gen_cli_reference.py`"


def test_reference_covers_every_command_and_option():
    from typer.main import get_command

    from grokcli.cli import app

    text = (DOCS / "cli-reference.md").read_text()
    group = get_command(app)
    for name, cmd in group.commands.items():
        if cmd.hidden:
            continue
        assert f"## `grok {name}`" in text
        for p in cmd.params:
            if p.param_type_name == "option" and not p.hidden:
                assert f"`{p.opts[0]}`" in text, (name, p.opts[0])


def test_guide_mentions_only_real_options():
    """Every `--option` the user guide shows is an option some command (or the root) accepts."""
    from typer.main import get_command

    from grokcli.cli import app

    group = get_command(app)
    known = {o for p in group.params for o in p.opts} | {"--help"}
    for cmd in group.commands.values():
        known |= {o for p in cmd.params for o in list(p.opts) + list(getattr(p, "secondary_opts", []))}
    guide = (DOCS / "guide.md").read_text()
    used = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]+)", guide))
    # Options of tools other than grok that the guide quotes.
    foreign = {"--upgrade", "--xla_force_host_platform_device_count", "--gpus"}
    assert not sorted(used - known - foreign), sorted(used - known - foreign)
