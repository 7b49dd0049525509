"""Every command example in README.md's Commands section parses with skindistil's own parser, and every
subcommand has one (.ci/readme_commands.py --run runs them all, top to bottom)."""

from __future__ import annotations

import importlib.util

from conftest import REPO
from skindistil.cli import COMMANDS


def _checker():
    spec = importlib.util.spec_from_file_location("readme_commands", REPO / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_readme_command_parses_and_every_subcommand_has_an_example():
    checker = _checker()
    commands = checker.readme_commands((REPO / "README.md").read_text(encoding="utf-8"))
    assert checker.parse_all(commands) == []
    shown = {argv[0] for argv in map(checker.skindistil_argv, commands) if argv}
    assert shown == set(COMMANDS), set(COMMANDS) ^ shown
    # inline examples count too (an ISIC id in a path is no placeholder such as COMMAND)
    assert any(line.startswith("skindistil evaluate --predictions") for line in commands)
    assert not any("COMMAND" in line for line in commands)
    # the serve example waits for readiness before its request and stops the server after it
    serve = next(i for i, line in enumerate(commands) if line.startswith("skindistil serve"))
    assert commands[serve].endswith("&")
    assert "/health" in commands[serve + 2] and any(line.startswith("kill") for line in commands[serve:])


def test_the_checker_catches_a_stale_option():
    checker = _checker()
    text = ("## Commands\n```bash\nskindistil predict --model runs/m x.jpg --no-such-option\n"
            "skindistil serve --model runs/m \\\n  --port 8000\n```\n## End\n")
    commands = checker.readme_commands(text)
    assert commands == ["skindistil predict --model runs/m x.jpg --no-such-option",
                        "skindistil serve --model runs/m --port 8000"]
    assert checker.parse_all(commands) == commands[:1]  # only the stale option fails


def test_the_runner_leaves_a_foreground_server_out_and_runs_the_rest(capfd):
    """A `skindistil serve` example without `&` would serve until stopped: `--run` names it and goes on."""
    checker = _checker()
    assert checker.run_all(["skindistil serve --model no-such-model --port 8765", "echo after-the-server"], None) == 0
    out = capfd.readouterr().out
    assert "not run (serves until stopped): skindistil serve --model no-such-model" in out and "after-the-server" in out
    # a backgrounded server is run (here it fails at once: no such model), and the failure stops the run
    assert checker.run_all(["skindistil serve --model no-such-model --port 8765 &", "wait $!"], None) != 0
