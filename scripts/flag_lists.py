"""Every script's command-line flags, as its `--help` lists them: the interface a refactor must keep.

    python scripts/flag_lists.py > tests/fixtures/flags.json

tests/test_layout.py compares the scripts' flags today with the list recorded in tests/fixtures/flags.json.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "train.py": [],
    "inference.py": [],
    "style_report.py": [],
    "export.py": [],
    "bench.py": [],
    "serve.py": [],
    "dataset.py build": ["build"],
    "dataset.py tokenizer": ["tokenizer"],
}
OPTION_LINE = re.compile(r"^\s{1,8}(-.*?)(?:\s{2,}|$)")  # an option line: its flags, then two spaces and the help


def flags_in_help(text: str) -> list[str]:
    """The option strings of an argparse `--help`: the flags each option line starts with."""
    flags = set()
    for line in text.splitlines():
        match = OPTION_LINE.match(line)
        if match:
            flags.update(re.findall(r"(?<![\w-])-{1,2}[a-zA-Z][-\w]*", match.group(1)))
    return sorted(flags)


def script_flags(root: Path = REPO) -> dict[str, list[str]]:
    """{command: its flags}, from running each script's `--help` in `root`."""
    found = {}
    for name, sub in COMMANDS.items():
        script = name.split()[0]
        text = subprocess.run(
            [sys.executable, str(root / script), *sub, "--help"], capture_output=True, text=True, check=True
        ).stdout
        found[name] = flags_in_help(text)
    return found


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO
    print(json.dumps(script_flags(root), indent=1))
