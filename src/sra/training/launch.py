"""Start-up of a multi-process launch: one run directory seen by every process, decisions made on
the main process and broadcast, and slow one-off work done before the first step.

Why: with several nodes, every decision a process makes from its own view of the disk (which
checkpoints exist, whether one verifies) can differ between nodes, and a process that waits in
a collective while the main process hashes an 11 GB checkpoint or downloads a reference batch
is killed by the process group's watchdog (``--dist-timeout``). So:

- :func:`check_shared_run_dir`: the main process writes a random token into the run directory;
  every process must read it back (each node its own disk → one clear error on every process);
- :func:`broadcast_from_main`: the main process decides, the others receive the decision;
- ``acc.main_process_first()`` around downloads: the main process fetches, the others find
  the file in the cache.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import TypeVar

from sra.errors import SraError
from sra.oserrors import writing

T = TypeVar("T")
TOKEN_PREFIX = ".sra-launch-"


def broadcast_from_main(acc, value: T) -> T:
    """``value`` as the main process has it, on every process (pickled; small objects only)."""
    if acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value if acc.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def check_shared_run_dir(acc, run_dir: Path) -> None:
    """Every process must see ``run_dir`` as the main process does: checkpoints, RNG files and the
    resume decision live there. One error line on every process otherwise."""
    if acc.num_processes == 1:
        return
    token, error = secrets.token_hex(8), None
    path = run_dir / f"{TOKEN_PREFIX}{token}"
    if acc.is_main_process:
        try:
            with writing(path):
                run_dir.mkdir(parents=True, exist_ok=True)
                path.write_text(f"{socket.gethostname()} {os.getpid()}\n")
        except SraError as exc:  # every process must hear it, or the others wait forever
            error = str(exc)
    token, main_host, error = broadcast_from_main(acc, (token, socket.gethostname(), error))
    if error is not None:
        raise SraError(error)
    path = run_dir / f"{TOKEN_PREFIX}{token}"  # the main process's token
    acc.wait_for_everyone()
    from accelerate.utils import gather_object

    blind = gather_object([] if path.is_file() else [f"{acc.process_index} ({socket.gethostname()})"])
    acc.wait_for_everyone()  # everyone has looked before the token goes
    if acc.is_main_process:
        path.unlink(missing_ok=True)
    if blind:
        raise SraError(
            f"process(es) {', '.join(blind)} cannot see {run_dir} as the main process "
            f"(on {main_host}) writes it: every process of a launch must see the same run "
            f"directory (put --output-dir on a file system shared by all nodes)")
