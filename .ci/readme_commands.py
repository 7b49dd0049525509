#!/usr/bin/env python3
"""The README's command examples, checked as a new user would run them.

    python .ci/readme_commands.py                 # list them and parse each with skindistil's own parser
    python .ci/readme_commands.py --run           # run them top to bottom from the repository root
    python .ci/readme_commands.py --run --skip "^skindistil (run|demo)"   # without the long main jobs

Commands are the lines of the ```bash blocks and the inline `skindistil ...` examples of README.md's
"## Commands" section, in the order they appear. `--run` stops at the first failure, names it and
prints a table of commands with their wall time; run it with the virtual environment active.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = re.compile(r"^## Commands\n(.*?)^## ", re.S | re.M)
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`(skindistil [^`]+)`")
PLACEHOLDER = re.compile(r"(?<![\w/.-])[A-Z][A-Z_]{2,}(?![\w/.-])")  # COMMAND, RUN: not ISIC_0024306.jpg


def readme_commands(text: str) -> list[str]:
    """Shell command lines of the Commands section, in order (blocks and inline examples merged)."""
    section = SECTION.search(text)
    if section is None:
        raise SystemExit("README.md has no '## Commands' section")
    body = section.group(1)
    found: list[tuple[int, str]] = []
    for block in BLOCK.finditer(body):
        for offset, line in _lines(block.group(1), block.start(1)):
            found.append((offset, line))
    prose = BLOCK.sub(lambda m: " " * len(m.group(0)), body)
    for match in INLINE.finditer(prose):
        if not PLACEHOLDER.search(match.group(1)):  # `skindistil COMMAND --help` is a pattern, not an example
            found.append((match.start(1), " ".join(match.group(1).split())))
    return [line for _, line in sorted(found)]


def _lines(block: str, start: int):
    """(offset, command) per shell line of a block; a line ending in a backslash continues on the next."""
    offset, pending, pending_at = start, "", start
    for raw in block.splitlines(keepends=True):
        line = raw.split("   #", 1)[0].strip()
        if pending:
            line = f"{pending} {line}"
        else:
            pending_at = offset
        offset += len(raw)
        if line.endswith("\\"):
            pending = line[:-1].strip()
            continue
        pending = ""
        if line and not line.startswith("#"):
            yield pending_at, line


def skindistil_argv(line: str) -> list[str] | None:
    """The arguments after `skindistil` when the line runs the CLI (a trailing `&` dropped)."""
    words = shlex.split(line.rstrip("&").strip(), comments=True)
    return words[1:] if words and words[0] == "skindistil" else None


def parse_all(commands: list[str]) -> list[str]:
    """Parse every skindistil command with the real parser; returns the problems found."""
    sys.path.insert(0, str(REPO / "src"))
    from skindistil.cli import build_parser

    parser = build_parser()
    problems = []
    for line in commands:
        argv = skindistil_argv(line)
        if argv is None:
            continue
        try:
            parser.parse_args(argv)
        except SystemExit:
            problems.append(line)
    return problems


FOREGROUND_SERVER = re.compile(r"^skindistil serve\b(?!.*&\s*$)")


def run_all(commands: list[str], skip: re.Pattern | None) -> int:
    """Run the commands in one bash process (so `SERVER=$!` reaches `kill $SERVER`), each announced and
    timed; `set -e` stops at the first failure. A server started in the foreground (an example of its
    options) would never return: it is named and not run (the backgrounded example is)."""
    script = ["set -euo pipefail", "_lap() { echo \"took $(( $(date +%s) - _t )) s\"; }"]
    for line in commands:
        if skip and skip.search(line):
            script.append(f"echo {shlex.quote('skipped: ' + line)}")
            continue
        if FOREGROUND_SERVER.search(line):
            script.append(f"echo {shlex.quote('not run (serves until stopped): ' + line)}")
            continue
        script += [f"echo {shlex.quote('$ ' + line)}", "_t=$(date +%s)", line, "_lap"]
    result = subprocess.run(["bash", "-c", "\n".join(script)], cwd=REPO)
    if result.returncode != 0:
        print(f"FAILED (exit {result.returncode}): the command above the last '$' line", file=sys.stderr)
    return result.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help="run the commands (default: list and parse them)")
    parser.add_argument("--skip", type=re.compile, help="regular expression of command lines not to run")
    args = parser.parse_args()
    commands = readme_commands((REPO / "README.md").read_text(encoding="utf-8"))
    if args.run:
        return run_all(commands, args.skip)
    for line in commands:
        print(line)
    problems = parse_all(commands)
    for line in problems:
        print(f"does not parse: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
