"""bench/RESULTS.md, where every benchmark script records its runs.

The file has one ``## `` section per script (named by the script's
``SECTION``); each run is a ``### `` subsection holding the command, the date,
the machine and the tables, the newest first. Writing a run leaves the other
sections and the earlier runs as they were.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Optional

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = ("# Benchmark results\n\nEvery number here comes from a script under `bench/`, with the command, the date "
          "and the machine beside it. Ratios compare tools measured in the same run.\n")


def add_run(section: str, text: str, title: Optional[str] = None) -> None:
    """Record ``text`` as the newest run of ``section`` (a ``## `` heading), under
    ``### {title}`` (default: the date); a missing section is added at the end."""
    title = title or f"Run of {datetime.date.today().isoformat()}"
    body = RESULTS.read_text() if RESULTS.exists() else HEADER
    run = f"### {title}\n\n{text.strip()}\n\n"
    start = body.find(section + "\n")
    if start < 0:
        body = f"{body.rstrip()}\n\n{section}\n\n{run}"
    else:
        at = start + len(section) + 1
        at += len(body[at:]) - len(body[at:].lstrip("\n"))  # past the blank lines under the heading
        body = body[:at] + run + body[at:]
    RESULTS.write_text(body.rstrip() + "\n")


def gpu_machine() -> str:
    """The GPU, torch and Triton versions and the host, for a run's header."""
    import torch
    import triton

    return (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"{platform.processor() or platform.machine()} host {platform.node() or 'unknown'}")


def add_command_run(section: str, machine: str, text: str) -> None:
    """``add_run`` of ``text`` under the command line that ran (``sys.argv``), the date and ``machine``."""
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    add_run(section, f"Command: `{command}`  \nDate: {datetime.date.today().isoformat()}  \n"
                     f"Machine: {machine}\n\n{text}")
