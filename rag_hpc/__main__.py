"""``rag-hpc <command> [arguments]`` (and ``python -m rag_hpc <command>``): one entry point for every stage.

Each command is exactly ``python -m rag_hpc.<command>`` (its ``--help``, its arguments, its exit code),
run in this process: the README's ``python -m`` forms and these are one thing, and a light command
(status, guard) still imports only what it needs.
"""

from __future__ import annotations

import runpy
import sys

COMMANDS = {
    "launch": "the whole pipeline: guard, index array, training, imputation (SLURM, or --cluster local)",
    "status": "what the launches in a workdir are doing",
    "guard": "plan RAM, disk and GPU memory before anything runs",
    "simulate": "simulate a demo panel and targets (msprime)",
    "prepare": "a phased panel VCF to panel.h5",
    "index": "build window shards and donor-table parts (one index-array task)",
    "train": "train the model (resumes from the run's newest checkpoint)",
    "phase": "phase unphased targets with Beagle against the panel's train split",
    "impute": "impute targets to a bgzipped VCF with GT:DS:GP",
    "evaluate": "dosage r² by MAF bin against a truth VCF",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return "usage: rag-hpc <command> [arguments]   (rag-hpc <command> --help for its own)\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"rag-hpc: unknown command {command!r}: choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    sys.argv = [f"rag-hpc {command}", *rest]
    try:
        runpy.run_module(f"rag_hpc.{command}", run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            return exit.code or 0
        print(exit.code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
