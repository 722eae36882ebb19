"""Run a test function on N CPU processes joined by gloo, the way ``accelerate launch`` /
torchrun start them (RANK, WORLD_SIZE, MASTER_ADDR … in the environment), and collect what each
process returns."""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        result: Any = {"ok": fn(rank, *args)}
    except BaseException as exc:  # reported to the parent, which fails the test with it
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    Path(out, f"rank-{rank}.json").write_text(json.dumps(result))


def run_processes(fn: Callable, *args, world: int = 2, out: Path, timeout: float = 300) -> list:
    """``fn(rank, *args)`` on ``world`` processes; returns each rank's return value (JSON), or
    raises with the first failing rank's traceback. ``fn`` must be importable (module level)."""
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args, str(out)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):  # one exit per call
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"the {world} processes did not finish within {timeout} s")
    results = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]
    for r, res in enumerate(results):
        if "error" in res:
            raise AssertionError(f"rank {r}: {res['error']}\n{res['traceback']}")
    return [res["ok"] for res in results]
