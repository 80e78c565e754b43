import sys

from rag_hpc.cli import run_main
from rag_hpc.launch import build_parser, main

sys.exit(run_main(main, build_parser()))
