"""A study regime file (``studies/regimes/NAME.toml``) → its arms, and each run's ``sra train``
command line.

A regime file holds the study-wide settings (``steps``, ``seeds``, ``metric``, ``baseline``,
``control``, ``late``), a ``[flags]`` table every run gets, and one ``[arms.NAME]`` table per arm:
``preset`` plus its own ``flags``. A flag table maps a ``sra train`` flag without its dashes to
a value: ``true`` is the bare flag, ``false`` the word ``false``, a list is comma-joined, anything
else its text. Runs live in ``WORK/REGIME/sSEED/ARM`` (``--output-dir WORK/REGIME/sSEED
--exp-name ARM``): every seed of an arm has the same exp_name, which names the arm in
``sra compare --name-by exp_name``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGIMES_DIR = Path(__file__).resolve().parent / "regimes"
SETTINGS = {"description", "steps", "seeds", "metric", "baseline", "control", "late", "flags", "arms"}
ARM_KEYS = {"preset", "flags", "about"}


class SpecError(ValueError):
    """A regime file that cannot be read as a study (the message says where)."""


@dataclass(frozen=True)
class Arm:
    """One arm: a preset and its flag overrides."""

    name: str
    preset: str
    flags: dict[str, Any] = field(default_factory=dict)
    about: str = ""


@dataclass(frozen=True)
class Study:
    """A regime: its arms and the settings shared by all their runs."""

    name: str
    description: str
    steps: int
    seeds: tuple[int, ...]
    metric: str
    baseline: str
    control: str | None
    late: float
    flags: dict[str, Any]
    arms: tuple[Arm, ...]

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def run_dir(self, work: Path, arm: str, seed: int) -> Path:
        """Where the run of ``arm`` with ``seed`` lives."""
        return Path(work) / self.name / f"s{seed}" / arm

    def train_args(self, arm: str, seed: int, work: Path, steps: int | None = None) -> list[str]:
        """The ``sra train`` arguments of one run (without ``--resume``): the arm's preset, the
        study's flags, the arm's flags (they win), then the run's length, seed and place."""
        a = self.arm(arm)
        run = self.run_dir(work, arm, seed)
        return (["--preset", a.preset, *flag_args(self.flags), *flag_args(a.flags),
                 "--max-train-steps", str(steps or self.steps), "--seed", str(seed),
                 "--output-dir", str(run.parent), "--exp-name", arm])


def flag_args(flags: dict[str, Any]) -> list[str]:
    """A flag table → command-line words."""
    out: list[str] = []
    for name, value in flags.items():
        out.append(f"--{name}")
        if value is True:
            continue
        if value is False:
            out.append("false")
        elif isinstance(value, list):
            out.append(",".join(str(v) for v in value))
        else:
            out.append(str(value))
    return out


def regime_path(name_or_path: str | Path) -> Path:
    """A regime's file: a path to a .toml, or the name of one in ``studies/regimes/``."""
    p = Path(name_or_path)
    return p if p.suffix == ".toml" else REGIMES_DIR / f"{p.name}.toml"


def regime_names() -> list[str]:
    """The regimes shipped in ``studies/regimes/``."""
    return sorted(p.stem for p in REGIMES_DIR.glob("*.toml"))


def load_study(name_or_path: str | Path) -> Study:
    """Read and check a regime file."""
    path = regime_path(name_or_path)
    if not path.is_file():
        raise SpecError(f"no regime file {path}; shipped: {', '.join(regime_names())}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not TOML ({exc})") from None
    unknown = set(raw) - SETTINGS
    if unknown:
        raise SpecError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}; allowed: "
                        f"{', '.join(sorted(SETTINGS))}")
    arms = tuple(_arm(path, n, a) for n, a in (raw.get("arms") or {}).items())
    if not arms:
        raise SpecError(f"{path}: no [arms.NAME] tables")
    names = [a.name for a in arms]
    study = Study(name=path.stem, description=raw.get("description", ""),
                  steps=int(raw.get("steps", 1000)), seeds=tuple(raw.get("seeds", (0, 1, 2))),
                  metric=raw.get("metric", "digits_fd"), baseline=raw.get("baseline", names[0]),
                  control=raw.get("control"), late=float(raw.get("late", 1 / 3)),
                  flags=dict(raw.get("flags") or {}), arms=arms)
    for role in ("baseline", "control"):
        value = getattr(study, role)
        if value is not None and value not in names:
            raise SpecError(f"{path}: {role} {value!r} is not an arm; arms: {', '.join(names)}")
    return study


def _arm(path: Path, name: str, table: dict) -> Arm:
    unknown = set(table) - ARM_KEYS
    if unknown or "preset" not in table:
        raise SpecError(f"{path}: [arms.{name}] needs a preset and may have flags and about; "
                        f"found {', '.join(sorted(table)) or 'nothing'}")
    return Arm(name, table["preset"], dict(table.get("flags") or {}), table.get("about", ""))


def resolved_config(args: list[str]):
    """The :class:`~sra.training.config.TrainConfig` ``sra train ARGS`` would train (validated
    the way the command does: a flag it refuses raises its one-line error)."""
    from sra.cli import build_parser
    from sra.commands.train import config_from_args

    return config_from_args(build_parser().parse_args(["train", *args]))
