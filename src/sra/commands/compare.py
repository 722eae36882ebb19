"""``sra compare RUN_DIR...``: training runs side by side — is one method better than another at
equal steps and at equal compute, beyond the seed noise?

Runs whose resolved configs differ only in the seed and in run-local fields (output dir, exp
name, logging, checkpoint and evaluation cadence, number of processes) form one arm; arms are
named by the config keys that differ between them (e.g. align.enabled=false). Per arm: the
metric at each evaluation step all runs share, mean ± SE over seeds; Δ vs the baseline, paired
by seed when the baseline has each of the arm's seeds, else Welch, bold where |Δ| > 2 SE; the
same at equal compute (the compute_s of the metrics records; linear between evaluations, never
extrapolated) and, when batch sizes differ, at equal images seen; the late-window mean; the
compute per step × the baseline's. Writes compare.md, compare.json and compare.png into --out
and prints the tables. A metric measured differently (--fid-ref, --fid-sampler, --fid-samples)
is an error; arms of different model or data sizes are a warning.

    sra compare runs/vanilla-s0 runs/vanilla-s1 runs/sra-s0 runs/sra-s1 --out reports/
    sra compare runs/*/ --metric digits_acc --name-by exp_name --late 0.5
"""

from __future__ import annotations

import argparse
import sys


def fraction(text: str) -> float:
    """A number in (0, 1] (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def register(subparsers) -> None:
    """Add ``sra compare``."""
    from sra.compare.pipeline import DEFAULT_LATE

    p = subparsers.add_parser("compare", help="runs side by side: arms, mean ± SE over seeds, Δ "
                              "vs a baseline at equal steps and equal compute",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directories written by `sra train` (each with config.json and "
                        "metrics.jsonl); a run without records of the metric is reported and left out")
    p.add_argument("--metric", default=None,
                   help="the metrics.jsonl key to compare (default: fid when a run has it, else "
                        "digits_fd); lower is better except for inception_score, digits_acc, "
                        "precision, recall")
    p.add_argument("--baseline", default=None, metavar="ARM",
                   help="the arm every other is compared with (default: the first arm without an "
                        "alignment term, else the first arm)")
    p.add_argument("--name-by", default=None, metavar="KEY[,KEY]",
                   help="name the arms by these config keys' values (dotted, e.g. exp_name or "
                        "align.weight) instead of the keys that differ; values that differ only "
                        "by a trailing seed number (vanilla-s0, vanilla-s1) give their common part")
    p.add_argument("--late", type=fraction, default=DEFAULT_LATE, metavar="FRACTION",
                   help="the late window: the mean over the last ⌈FRACTION·n⌉ of the n common "
                        "evaluations (default: 1/3)")
    p.add_argument("--out", default=".", metavar="DIR",
                   help="folder for compare.md, compare.json and compare.png (default: the "
                        "current directory)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sra.compare import compare
    from sra.compare.plot import write_plot
    from sra.compare.report import markdown, write_report

    name_by = [k.strip() for k in args.name_by.split(",") if k.strip()] if args.name_by else []
    cmp = compare(args.runs, metric=args.metric, baseline=args.baseline, name_by=name_by,
                  late=args.late)
    paths = write_report(cmp, args.out)
    paths["plot"] = write_plot(cmp, paths["markdown"].parent / "compare.png")
    print(markdown(cmp))
    for w in cmp.warnings:
        print(f"sra compare: warning: {w}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
