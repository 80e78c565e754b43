"""What every benchmark reports about the machine it ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """'AMD EPYC, 2 cores, 24 GiB' (+ the GPU when torch sees one)."""
    line = f"{cpu_model()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    try:
        import torch

        if torch.cuda.is_available():
            line += f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return line
