"""Checkpoint integrity: the manifest, verification, damaged or hostile files as one-line errors
(``sra sample`` / ``sra pca`` exit 2 naming the file), and resuming past a damaged checkpoint."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from sra.cli import main
from tiny import tiny_config
from sra.errors import SraError
from sra import checkpoints as ckpts
from sra.training import checkpoint as ckpt
from sra.training.loop import Trainer


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A tiny finished run: 4 steps, checkpoints at steps 2 and 4 (written by the real loop)."""
    cfg = tiny_config(tmp_path_factory.mktemp("integrity"), **{
        "model.depth": 2, "align.teacher_block": 2, "loop.global_batch_size": 8,
        "loop.max_train_steps": 4, "loop.checkpoint_steps": 2, "loop.keep_last": 2,
        "loop.milestone_steps": 0})
    return Trainer(cfg).fit()


@pytest.fixture
def run(pristine, tmp_path) -> Path:
    """A private copy of the run, to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "run"))


def step(run: Path, n: int) -> Path:
    return run / "checkpoints" / f"step-{n:07d}"


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def scramble(path: Path, size: int | None = None) -> None:
    """Random bytes, of the file's own size unless ``size`` (same size: only a checksum tells)."""
    path.write_bytes(os.urandom(size if size is not None else path.stat().st_size))


def drop_manifest(ckpt_dir: Path) -> None:
    """Make a checkpoint look like one written before manifests existed."""
    (ckpt_dir / "manifest.json").unlink()
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    del meta["manifest_sha256"]
    (ckpt_dir / "meta.json").write_text(json.dumps(meta))


def sample_argv(ckpt_path, tmp_path, *extra) -> list[str]:
    return ["sample", "--ckpt", str(ckpt_path), "--num-samples", "2", "--per-proc-batch-size", "2",
            "--num-steps", "2", "--grid-size", "0", "--no-progress", "--cpu",
            "--output-dir", str(tmp_path / "samples"), *extra]


def pca_argv(ckpt_path, tmp_path, *extra) -> list[str]:
    return ["pca", "--ckpt", str(ckpt_path), "--device", "cpu", "--out", str(tmp_path / "p.png"),
            *extra]


def one_line_error(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI; assert exit 2 and exactly one stderr line ``sra CMD: error: …`` holding
    every needle and no advice to disable weights_only."""
    capsys.readouterr()
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"sra {argv[0]}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "weights_only" not in lines[0]
    return lines[0]


class Payload:
    """Unpickling this creates ``path``: proof that pickled code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# -- healthy ---------------------------------------------------------------------------------------
def test_manifest_covers_every_file_and_healthy_checkpoints_load(pristine, tmp_path, capsys):
    for d in ckpts.list_checkpoints(pristine):
        manifest = json.loads((d / "manifest.json").read_text())
        names = {p.name for p in d.iterdir()} - {"meta.json", "manifest.json"}
        assert set(manifest["files"]) == names >= {"model.safetensors", "ema.safetensors",
                                                   "optimizer.pt", "rng-0.pt"}
        for name, entry in manifest["files"].items():
            assert ckpts.file_sha256(d / name) == (entry["size"], entry["sha256"])
        meta = ckpts.read_meta(d)
        assert meta["manifest_sha256"] == ckpts.file_sha256(d / "manifest.json")[1]
        ckpts.verify_checkpoint(d)
    state = ckpt.load_training_state(step(pristine, 4), 0)
    assert state.step == 4 and state.scaler is None and state.rng is not None
    assert set(state.model) >= set(state.ema) and "state" in state.optimizer
    assert ckpt.load_training_state(step(pristine, 4), 1).rng is None  # no rng-1.pt
    found, skipped = ckpt.find_resumable_state(pristine)
    assert found.path == step(pristine, 4) and skipped == []
    assert main(sample_argv(pristine, tmp_path)) == 0


# -- damaged checkpoint dirs through the CLI -------------------------------------------------------
DAMAGES = {
    "truncated model": ("model.safetensors", truncate, "truncated: "),
    "random ema": ("ema.safetensors", scramble, "checksum mismatch"),
    "corrupt meta": ("meta.json", lambda p: p.write_text('{"step": 4, "con'),
                     "corrupt (not valid JSON"),
    "corrupt manifest": ("manifest.json", lambda p: p.write_bytes(os.urandom(300)), "corrupt"),
    "truncated optimizer": ("optimizer.pt", truncate, "truncated: "),
}


@pytest.mark.parametrize("command", ["sample", "pca"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_dir_is_one_line(run, tmp_path, capsys, command, damage):
    name, hurt, needle = DAMAGES[damage]
    target = step(run, 4) / name
    hurt(target)
    argv = (sample_argv if command == "sample" else pca_argv)(run, tmp_path)  # run dir → step 4
    one_line_error(capsys, argv, f"{target}: {needle}")
    assert not (tmp_path / "samples").exists() and not (tmp_path / "p.png").exists()


def test_checkpoint_without_manifest_is_verified_by_parsing(run, tmp_path, capsys):
    d = step(run, 4)
    drop_manifest(d)
    ckpts.verify_checkpoint(d)  # an intact old-style checkpoint passes
    assert main(sample_argv(d, tmp_path)) == 0
    truncate(d / "model.safetensors")
    one_line_error(capsys, sample_argv(d, tmp_path / "b"), f"{d / 'model.safetensors'}: truncated: ")
    scramble(d / "model.safetensors", 5000)
    one_line_error(capsys, pca_argv(d, tmp_path), f"{d / 'model.safetensors'}: not a safetensors file")
    e = step(run, 2)
    drop_manifest(e)
    scramble(e / "rng-0.pt")
    with pytest.raises(SraError, match=r"rng-0\.pt: not a tensors-only torch file") as exc:
        ckpt.load_training_state(e, 0)
    assert "weights_only" not in str(exc.value) and "\n" not in str(exc.value)
    shutil.copy(step(run, 4) / "rng-0.pt", e / "rng-0.pt")
    truncate(e / "optimizer.pt")
    with pytest.raises(SraError, match=r"optimizer\.pt: truncated or corrupt"):
        ckpt.load_training_state(e, 0)


# -- load_training_state ---------------------------------------------------------------------------
def test_load_training_state_names_the_damaged_file(run):
    d = step(run, 4)
    truncate(d / "optimizer.pt", 0.3)
    size, want = (d / "optimizer.pt").stat().st_size, ckpts.file_sha256(step(run, 2) / "optimizer.pt")[0]
    with pytest.raises(SraError, match=rf"step-0000004/optimizer\.pt: truncated: {size} of \d+ bytes"):
        ckpt.load_training_state(d, 0)
    assert want > size
    d = step(run, 2)
    scramble(d / "rng-0.pt")
    with pytest.raises(SraError, match=r"step-0000002/rng-0\.pt: checksum mismatch"):
        ckpt.load_training_state(d, 0)
    # where verification is skipped (another process verified), parsing still catches it
    with pytest.raises(SraError, match=r"rng-0\.pt: not a tensors-only torch file"):
        ckpt.load_training_state(d, 0, verify=False)
    (d / "ema.safetensors").unlink()
    with pytest.raises(SraError, match=r"ema\.safetensors: missing"):
        ckpts.verify_checkpoint(d, hashes=False)
    with pytest.raises(SraError, match="not found"):
        ckpts.verify_checkpoint(run / "nope")


# -- files passed on their own ---------------------------------------------------------------------
def test_bare_files_as_ckpt_are_one_line(run, tmp_path, capsys):
    bare = tmp_path / "bare.safetensors"
    shutil.copy(step(run, 4) / "ema.safetensors", bare)
    assert main(sample_argv(bare, tmp_path / "ok", "--data-kind", "pixels")) == 0
    truncate(bare, 0.7)
    for argv in (sample_argv(bare, tmp_path, "--data-kind", "pixels"), pca_argv(bare, tmp_path)):
        one_line_error(capsys, argv, f"{bare}: truncated: ")
    scramble(bare)
    one_line_error(capsys, sample_argv(bare, tmp_path, "--data-kind", "pixels"), f"{bare}: ")
    # a weights file inside a checkpoint dir is checked against that dir's manifest
    inside = step(run, 4) / "ema.safetensors"
    scramble(inside)
    one_line_error(capsys, pca_argv(inside, tmp_path), f"{inside}: checksum mismatch")

    noise = tmp_path / "noise.pt"
    scramble(noise, 4096)
    for argv in (sample_argv(noise, tmp_path), pca_argv(noise, tmp_path)):
        one_line_error(capsys, argv, f"{noise}: not a tensors-only torch file")


def test_pickled_code_is_never_run(tmp_path, capsys):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(proof)))  # the payload works when unpickled unsafely
    assert proof.exists()
    marker = tmp_path / "marker"
    files = {tmp_path / "release.pt": "refused: it references code (io.open), which is never run",
             tmp_path / "plain2.pt": "refused: it references code (io.open), which is never run",
             # protocol 4 framing already stops torch's restricted unpickler, before any name
             tmp_path / "plain4.pt": "not a tensors-only torch file"}
    torch.save({"model": Payload(marker), "ema": {}, "args": None}, tmp_path / "release.pt")
    for protocol in (2, 4):
        with open(tmp_path / f"plain{protocol}.pt", "wb") as f:
            pickle.dump({"ema": Payload(marker)}, f, protocol=protocol)
    for path, needle in files.items():
        for argv in (sample_argv(path, tmp_path), pca_argv(path, tmp_path)):
            one_line_error(capsys, argv, f"{path}: {needle}")
        with pytest.raises(SraError, match=needle.split(" (")[0]):
            ckpts.load_weights(path)
    assert not marker.exists()


def test_shape_mismatch_is_one_line(run, tmp_path, capsys):
    d = step(run, 4)
    meta = json.loads((d / "meta.json").read_text())
    meta["config"]["model"]["hidden_size"] = 64
    (d / "meta.json").write_text(json.dumps(meta))
    ckpts.verify_checkpoint(d)  # intact files, they just belong to another architecture
    one_line_error(capsys, sample_argv(d, tmp_path), str(d), "does not fit this architecture")
    del meta["config"]["model"]
    (d / "meta.json").write_text(json.dumps(meta))
    one_line_error(capsys, pca_argv(d, tmp_path), f"{d / 'meta.json'}: corrupt (no model config")


# -- resume ----------------------------------------------------------------------------------------
def test_find_resumable_falls_back_past_damaged_checkpoints(run):
    newest, older = step(run, 4), step(run, 2)
    truncate(newest / "ema.safetensors")
    state, skipped = ckpt.find_resumable_state(run)
    assert state.path == older and len(skipped) == 1
    assert skipped[0][0] == newest and skipped[0][1].startswith("ema.safetensors: truncated: ")
    assert state.step == 2 and state.rng is not None
    # damaged checkpoints are left alone: listing and pruning behave as before
    assert ckpts.latest_checkpoint(run) == newest
    assert ckpts.list_checkpoints(run) == [older, newest]
    (older / "meta.json").write_text("{")
    found, skipped = ckpt.find_resumable_state(run)
    assert found is None and [p for p, _ in skipped] == [newest, older]
    assert skipped[1][1].startswith("meta.json: corrupt (not valid JSON")
    assert ckpt.find_resumable_state(run / "empty") == (None, [])
    assert ckpts.checkpoint_step(newest) == 4 and ckpts.checkpoint_path(run, 2) == older
