"""How the throughput benchmarks report: markdown tables and cells, the marked section of a docs
file they replace, the command line they were run with, and their JSON results."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import torch


def describe_machine(info: dict) -> str:
    """One line for reports."""
    dev = info.get("gpu") or f"CPU {info['cpu']} ({info['cpu_count']} cores visible)"
    line = (f"{dev}; torch {info['torch']}, torch threads: {info['torch_threads']}, "
            f"python {info['python']}")
    if info.get("load_avg_1m") is not None:
        line += f"; 1-min load average at start {info['load_avg_1m']:.2f}"
    return line


def fmt_bytes(n: float) -> str:
    """1536 → '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def amp_name(amp: torch.dtype | None) -> str:
    """An autocast dtype for reports: "bfloat16", "float16" or "none"."""
    return str(amp).replace("torch.", "") if amp is not None else "none"


def fmt_peak(p: dict) -> str:
    """A path's peak memory and, in brackets, what its step/run added."""
    return f"{fmt_bytes(p['peak_mem_bytes'])} (+{fmt_bytes(p['added_mem_bytes'])})"


def fmt_speedup(p: dict) -> str:
    """A path's speed-up over the release path (the release itself: 1.00×)."""
    return f"{p['speedup_vs_release']:.2f}×" if "speedup_vs_release" in p else "1.00×"


def run_line(results: dict, unit: str) -> str:
    """The report's first sentence: machine, command, warm-up and measured ``unit`` per path."""
    return (f"Machine: {describe_machine(results['machine'])}. Command: `{results['command']}`. "
            f"{results['warmup']} warm-up + {results['repeats']} measured {unit} per path")


def memory_kind(results: dict) -> str:
    """What the memory figures of a results record measure."""
    return next(iter(results["cases"][0]["paths"].values()))["memory_kind"]


def path_legend(choices: dict[str, str], results: dict) -> list[str]:
    """"- **path**: description" for every path that ran in some case."""
    return [f"- **{k}**: {v}" for k, v in choices.items()
            if any(k in c["paths"] for c in results["cases"])]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(path: str | os.PathLike, name: str, markdown: str) -> None:
    """Put ``markdown`` between ``<!-- name:begin -->`` / ``<!-- name:end -->`` in ``path``
    (replacing an earlier version of that section, or appending it)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}\n"
    p = Path(path)
    text = p.read_text() if p.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block.rstrip("\n") + tail
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + block
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


OUTPUT_FLAGS = ("--out", "--section", "--json")  # where results go, not what is measured


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The benchmark's command line for reports, without the output-only flags."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in OUTPUT_FLAGS:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in OUTPUT_FLAGS)):
            kept.append(a)
    return " ".join([script, *kept])


def dump_json(obj: dict, path: str | os.PathLike | None) -> None:
    """Write results as JSON (to stdout when ``path`` is ``-``)."""
    if path is None:
        return
    text = json.dumps(obj, indent=2, default=str)
    if str(path) == "-":
        print(text)
    else:
        Path(path).write_text(text + "\n")


def publish(results: dict, markdown: str, args) -> None:
    """Print the report, and write it where the common flags say (``--out``/``--section``, ``--json``)."""
    print(markdown)
    if args.out:
        write_section(args.out, args.section, markdown)
    dump_json(results, args.json)
