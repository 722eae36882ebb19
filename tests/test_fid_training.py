"""FID while training: the records land in metrics.jsonl and the curves, and the numbers equal
what `sra eval` gives on the very same samples (digits classifier FD; Inception FID/IS)."""

import json

import numpy as np
import pytest
import torch

from sra.cli import main
from sra.data.adm_npz import write_adm_npz
from sra.training.config import preset
from tiny import tiny_config
from sra.training.fid import FIDConfig, QualityProbe
from sra.training.loop import Trainer

TINY = ["--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--block-out-s", "1",
        "--block-out-t", "2", "--batch-size", "32", "--grid-samples", "4", "--report-to", "none"]


def test_digits_run_reports_the_classifier_fd_at_each_requested_step(tmp_path):
    args = ["train", "--preset", "digits", *TINY, "--max-train-steps", "4", "--checkpoint-steps", "4",
            "--eval-samples", "30", "--fid-every", "2", "--fid-samples", "30", "--fid-batch-size", "16",
            "--fid-sampler", "ode-fast", "--output-dir", str(tmp_path)]
    assert main(args) == 0
    run = tmp_path / "digits-sra"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    quality = [r for r in rows if "digits_fd" in r]
    assert [r["step"] for r in quality] == [2, 4]
    assert all(r["digits_fd"] > 0 and 0 <= r["digits_acc"] <= 1 and r["fid_samples"] == 30
               and r["fid_seconds"] > 0 for r in quality)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["fid"]["sampler"]["mode"] == "heun" and cfg["fid"]["sampler"]["steps"] == 50  # recorded
    ev = json.loads((run / "eval_digits.json").read_text())
    assert ev["step"] == 4 and ev["sampler"]["mode"] == "heun"
    from sra.viz.curves import PANELS

    assert ("digits_fd" in dict(PANELS)) and (run / "curves.png").is_file()


def _trainer(tmp_path, **kw):
    cfg = tiny_config(tmp_path, **{"model.depth": 2, "align.teacher_block": 2,
                                   "loop.max_train_steps": 2, "loop.checkpoint_steps": 2,
                                   "loop.grid_samples": 0, **kw})
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer


def _probe(trainer, fid: FIDConfig, digits: bool) -> QualityProbe:
    t = trainer
    return QualityProbe(fid, t.accelerator, t.model_cfg, t.info, t.cfg.flow.path_type,
                        t.cfg.data.vae, digits=digits)


def test_in_training_digits_fd_equals_sra_eval_on_the_same_samples(tmp_path, capsys):
    trainer = _trainer(tmp_path)
    fid = FIDConfig(every=1, samples=24, batch_size=10, sampler=preset("digits").fid.sampler)
    probe = _probe(trainer, fid, digits=True)
    rec = probe(trainer.ema, 2)
    npz = tmp_path / "s.npz"
    images = probe.images(trainer.ema)
    write_adm_npz(npz, [images], len(images), images.shape[1:], probe.labels.numpy())
    assert main(["eval", str(npz), "--digits", "--no-progress"]) == 0
    out = json.loads((tmp_path / "s.metrics.json").read_text())
    assert rec["digits_fd"] == pytest.approx(out["digits_fd"], rel=1e-9)
    assert rec["digits_acc"] == out["digits_acc"]


def test_in_training_fid_equals_sra_eval_on_the_same_samples(tmp_path, capsys):
    from sra.eval.inception import save_random_inception_weights

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the random Inception is the slow part; one thread spins less
    try:
        _compare_fid(tmp_path, save_random_inception_weights(tmp_path / "inception.pth"))
    finally:
        torch.set_num_threads(threads)


def _compare_fid(tmp_path, weights):
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    trainer = _trainer(tmp_path)
    fid = FIDConfig(every=1, samples=12, batch_size=5, ref=str(ref), inception_weights=str(weights),
                    sampler=preset("digits").fid.sampler)
    probe = _probe(trainer, fid, digits=False)
    rec = probe(trainer.ema, 2)
    npz = tmp_path / "s.npz"
    images = probe.images(trainer.ema)
    write_adm_npz(npz, [images], len(images), images.shape[1:])
    assert main(["eval", str(npz), "--ref", str(ref), "--inception-weights", str(weights),
                 "--no-progress", "--device", "cpu"]) == 0
    out = json.loads((tmp_path / "s.metrics.json").read_text())
    assert rec["fid"] == pytest.approx(out["fid"], rel=1e-4, abs=1e-3)
    assert rec["inception_score"] == pytest.approx(out["inception_score"], rel=1e-5)
    # the reference statistics were computed once and cached beside the reference
    assert list(tmp_path.glob("ref.stats-*.npz"))


def test_fid_every_needs_a_reference_for_latent_data(tmp_path):
    trainer = _trainer(tmp_path)
    from sra.errors import SraError

    with pytest.raises(SraError, match="--fid-every needs --fid-ref"):
        _probe(trainer, FIDConfig(every=1), digits=False)
