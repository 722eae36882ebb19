"""The loop's bookkeeping on one process: the flat EMA update gives the per-tensor update's bits,
NaN/inf data is named as the cause, metrics stay strict JSON, fp16 overflows are not a
divergence, --align-until switches λ off exactly, and the compute column survives a resume."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from sra.errors import SraError
from sra.models import build_model, model_config
from sra.training.ema import EMAUpdater, flatten_parameters, make_ema, update_ema
from sra.training.health import Health
from sra.training.loop import Trainer
from tiny import tiny_config
from tiny_data import packed_data


def _strict(line: str) -> dict:
    def refuse(token):
        raise ValueError(f"bare {token} in metrics.jsonl")

    return json.loads(line, parse_constant=refuse)


def _records(run) -> list[dict]:
    return [_strict(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("apply", [None, True, False])
def test_flat_ema_update_equals_the_per_tensor_update_bit_for_bit(apply):
    torch.manual_seed(0)
    model = build_model(model_config("SiT-S/4", depth=2, hidden_size=32, num_heads=2,
                                     input_size=8, in_channels=1, num_classes=3))
    model.y_embedder.embedding_table.to(torch.bfloat16)  # a second dtype group
    twin = copy.deepcopy(model)
    ema_a, ema_b = make_ema(model), make_ema(twin)
    params = list(model.parameters())
    updater = EMAUpdater(ema_a, model)
    assert all(a is b for a, b in zip(params, model.parameters()))  # the same Parameter objects
    assert len(updater.ema_flats) == 2 and len(updater.model_flats) == 2  # fp32 and bf16
    flag = None if apply is None else torch.tensor(apply)
    for step in range(4):
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters()):
                noise = torch.randn_like(p)
                p.add_(noise)
                q.add_(noise)
        updater.update(0.9 - 0.1 * step, apply=flag)
        update_ema(ema_b, twin, 0.9 - 0.1 * step, apply=flag)
    for (name, a), b in zip(ema_a.state_dict().items(), ema_b.state_dict().values()):
        assert torch.equal(a, b), name


def test_flatten_keeps_values_and_makes_views():
    lin = nn.Linear(3, 4)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    (flat,) = flatten_parameters(lin)
    assert flat.numel() == 16
    assert all(torch.equal(before[k], v) for k, v in lin.state_dict().items())
    flat.zero_()
    assert not lin.weight.detach().any()


def _nan_data(tmp_path, bad):
    root = packed_data(tmp_path / "packed", n=40, num_classes=3)
    shard = tmp_path / "packed" / "shard-00001.npy"  # rows 5..9
    rows = np.load(shard, mmap_mode="r+")
    for i in bad:
        rows[i - 5, 0, 0, 0] = np.nan
    rows.flush()
    return root


def test_nan_in_the_data_is_named_and_metrics_stay_strict_json(tmp_path):
    root = _nan_data(tmp_path, bad=[5, 7, 8, 9] + [6])  # every row of shard 1
    cfg = tiny_config(tmp_path, **{"data.data_dir": root, "data.resolution": 32,
                                   "model.patch_size": 2, "fid.every": 0, "loop.grid_samples": 0,
                                   "loop.log_every": 1, "loop.max_consecutive_skips": 30})
    trainer = Trainer(cfg)
    finite = torch.stack([trainer.dataset[i][0] for i in range(40)]).isfinite()
    assert finite.view(40, -1).all(1).sum() == 35
    # a batch of 32 of 40 samples always holds one of the five bad ones: every step diverges
    with pytest.raises(SraError) as exc:
        Trainer(tiny_config(tmp_path, exp_name="stop", **{
            "data.data_dir": root, "data.resolution": 32, "model.patch_size": 2, "fid.every": 0,
            "loop.grid_samples": 0, "loop.log_every": 2, "loop.max_consecutive_skips": 4})).fit()
    msg = str(exc.value)
    assert "\n" not in msg and "stopping: 4 consecutive non-finite steps" in msg
    assert "the data holds NaN/inf" in msg and "learning rate" not in msg
    named = msg.split("dataset indices ")[1].split(" (first")[0].split(", ")
    assert named and set(map(int, named)) <= {5, 6, 7, 8, 9}
    assert "shard-00001.npy" in msg  # the first named sample's file
    recs = _records(tmp_path / "stop")
    assert [r["step"] for r in recs] == [2]  # the second check (step 4) stopped the run
    assert recs[0]["loss"] is None and recs[0]["skipped"] == 2  # null, never a bare NaN
    log_text = (tmp_path / "stop" / "log.txt").read_text()
    assert "non-finite loss/gradients" in log_text and "the data holds NaN/inf" in log_text


class _Acc:
    num_processes, device = 1, torch.device("cpu")

    class scaler:
        @staticmethod
        def get_scale():
            return 2.0 ** 12


def test_grad_scaler_overflows_are_logged_as_such_and_never_stop_the_run(caplog):
    health = Health(_Acc(), max_consecutive=3)
    no, yes = torch.tensor(False), torch.tensor(True)
    for step in range(5):  # calibration: five overflowed steps in a row
        health.guard.update(no, yes, step)
    caplog.set_level("INFO", logger="sra.train")
    assert health.check(5, lambda s: [], None, 8) == 5  # skipped, but no divergence
    assert "grad scaler: 5 overflow step(s)" in caplog.text and "non-finite" not in caplog.text
    for step in range(5, 8):  # now the loss itself is NaN three times in a row
        health.guard.update(no, no, step)
    with pytest.raises(SraError, match="3 consecutive non-finite steps reached by step 8"):
        health.check(8, lambda s: [], None, 8)


def test_a_finite_step_ends_a_divergent_run_but_an_overflow_does_not():
    health = Health(_Acc(), max_consecutive=3)
    no, yes = torch.tensor(False), torch.tensor(True)
    for finite, overflow in [(no, no), (no, yes), (no, no), (yes, no), (no, no)]:
        health.guard.update(finite, overflow)
    skipped, overflows, worst, last_bad = health.guard.read()
    assert (skipped, overflows, worst) == (4, 1, 2)


def test_align_until_switches_the_term_off_after_that_step(tmp_path):
    run = Trainer(tiny_config(tmp_path, **{"align.until": 3, "loop.log_every": 1,
                                          "fid.every": 0})).fit()
    train = [r for r in _records(run) if "loss" in r]
    assert [r["weight"] for r in train] == [0.5] * 3 + [0.0] * 3
    assert [r["align"] > 0 for r in train] == [True] * 3 + [False] * 3


def test_compute_column_grows_and_continues_across_a_resume(tmp_path):
    cfg = tiny_config(tmp_path, **{"loop.log_every": 1, "fid.every": 0})
    run = Trainer(cfg).fit()
    first = _records(run)
    meta = json.loads((run / "checkpoints" / "step-0000006" / "meta.json").read_text())
    assert meta["compute_s"] >= first[-1]["compute_s"] > first[0]["compute_s"] > 0
    assert [r["images_seen"] for r in first] == [32 * s for s in range(1, 7)]
    Trainer(tiny_config(tmp_path, **{"loop.log_every": 1, "fid.every": 0,
                                     "loop.max_train_steps": 8}), resume="auto").fit()
    after = [r for r in _records(run) if r["step"] > 6]
    assert after[0]["compute_s"] > meta["compute_s"]
    assert json.loads((run / "config.json").read_text())["compute_unit"] == "cpu-process-s"
