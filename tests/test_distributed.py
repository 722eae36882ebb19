"""Two gloo processes: one run directory for all, decisions on the main process, one
verification per resume, artefacts before the first step, a zero alignment (and dispersive)
weight under DDP (without find_unused_parameters), DDP's settings leave the numbers unchanged,
compute summed."""

import json
import math

import pytest

import gloo_workers
from gloo import run_processes


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return tmp, run_processes(gloo_workers.launch, str(tmp), out=tmp / "res")


def test_each_node_its_own_disk_is_refused_on_every_process(two_process_runs):
    for res in two_process_runs[1]:
        split = res["run_dir"]["split"]
        assert split is not None and "\n" not in split
        assert "cannot see" in split and "shared by all nodes" in split
        assert "process(es) 1" in split  # rank 0 wrote the token, so rank 1 is blind
        assert res["run_dir"]["left"] == []  # the shared root's token is gone once all looked


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_alignment_switched_off_mid_run_keeps_ddp_going(two_process_runs):
    tmp, _ = two_process_runs
    train = [r for r in _records(tmp / "a") if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    weights = [r["weight"] for r in train]
    assert weights[:2] == [0.5, 0.5] and weights[2:] == [0.0] * 6  # --align-until 2
    assert all(r["align"] == 0.0 for r in train[2:])
    # the dispersive term on top: on with SRA, off with it, and the run goes on past the switch
    assert [r["dispersive_weight"] for r in train] == [0.5, 0.5] + [0.0] * 6
    assert all(r["dispersive"] < 0 for r in train[:2]) and all(r["dispersive"] == 0 for r in train[2:])
    assert all(math.isfinite(r["loss"]) for r in train)


def test_the_main_process_alone_decides_and_verifies_the_resume(two_process_runs):
    _, (main, other) = two_process_runs
    assert main["resumed_step"] == other["resumed_step"] == 6
    assert main["verified"] == ["step-0000006"]  # hashed once, by the main process
    assert other["verified"] == []


def test_artefacts_are_ready_before_the_first_step(two_process_runs):
    _, (main, other) = two_process_runs
    assert main["classifier_steps"][0] == 0  # the digit classifier, fetched before step 1
    assert other["classifier_steps"] == []  # scoring happens on the main process


def test_ddp_settings_do_not_change_the_numbers(two_process_runs):
    _, (main, _) = two_process_runs
    assert main["ddp_settings_identical"]  # bucket-view gradients, no buffer broadcast


def test_compute_is_summed_over_processes_and_grows(two_process_runs):
    tmp, results = two_process_runs
    for res in results:
        assert res["compute_total"] == pytest.approx(sum(r["compute_local"] for r in results))
    compute = [r["compute_s"] for r in _records(tmp / "a")]
    assert all(b >= a for a, b in zip(compute, compute[1:])) and compute[-1] > 0
    assert json.loads((tmp / "a" / "config.json").read_text())["compute_unit"] == "cpu-process-s"
