"""What a command imports: light commands (status, guard) run on login nodes, where importing torch or
submitit takes seconds, so their tests check they load neither."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "submitit")


def run_and_list_heavy_imports(module: str, *args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run ``python -m module args`` in a fresh interpreter: its result, and which of ``HEAVY`` it imported."""
    probe = (
        "import json, runpy, sys\n"
        f"sys.argv = [{module!r}, *{list(args)!r}]\n"
        "try:\n    runpy.run_module(sys.argv[0], run_name='__main__')\nexcept SystemExit as exit:\n    code = exit.code\n"
        "else:\n    code = 0\n"
        f"print('imported:', json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
        "sys.exit(code)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("imported: "), out.stdout + out.stderr
    return out, json.loads(line.removeprefix("imported: "))
