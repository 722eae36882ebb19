"""Smoke test of the throughput benchmarks (benchmarks/bench_train.py, bench_sample.py)."""

import importlib
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def test_benchmarks_run_and_both_paths_agree(tmp_path):
    common = _load("common")
    bench_train = _load("bench_train")
    bench_sample = _load("bench_sample")
    from sra.models import model_config

    # The analytic FLOP counter reproduces the papers' 118.6 GMAC for SiT-XL/2 at 256 px, and
    # the SRA step counts 3 student forwards (head included) plus the teacher's blocks 1..t.
    xl = model_config("SiT-XL/2", input_size=32, use_head=False)
    assert abs(common.forward_macs(xl) / 1e9 - common.SIT_XL2_256_GMAC) < 0.05
    step = common.train_step_flops(model_config("SiT-XL/2", input_size=32), 20)
    assert step["teacher_fwd"] < step["student_fwd"]
    assert step["step"] == 3 * step["student_fwd"] + step["teacher_fwd"]

    md = tmp_path / "bench.md"
    threads = torch.get_num_threads()  # one thread: tiny ops on a busy machine stay fast
    try:
        _run_and_check(bench_train, bench_sample, md)
    finally:
        torch.set_num_threads(threads)


def _run_and_check(bench_train, bench_sample, md):
    res = bench_train.main(["--case", "tiny", "--device", "cpu", "--threads", "1", "--warmup", "1",
                            "--repeats", "1", "--out", str(md)])
    (case,) = res["cases"]
    assert set(case["paths"]) == {"ours", "release"}
    for name, p in case["paths"].items():
        assert p["n"] == 1 and p["median_s"] > 0 and p["images_per_s"] > 0
        assert p["peak_mem_bytes"] > 0 and p["state_bytes"] > 0
        assert len(p["losses"]) == 2  # warm-up + measured, same seeds on every path
        if name != "release":
            assert p["speedup_vs_release"] > 0
            # equal seeds → equal loss: the release's compute path computes the same function
            assert p["loss_step0_absdiff"] <= 1e-5 and p["loss_max_absdiff"] <= 1e-5
    assert case["paths"]["ours"]["align_step0"] > 0  # the alignment term really ran

    res = bench_sample.main(["--case", "tiny", "--device", "cpu", "--threads", "1", "--steps", "6",
                             "--warmup", "0", "--repeats", "1", "--out", str(md)])
    (case,) = res["cases"]
    ours, release = case["paths"]["ours"], case["paths"]["release"]
    assert ours["finite"] and release["finite"] and ours["images_per_s"] > 0
    assert case["output_std"] > 0.1  # non-trivial samples (adaLN-Zero layers were un-zeroed)
    # float32 state + SDPA vs float64 state + explicit attention: same samples within rounding
    assert 0 <= ours["rel_diff_vs_release"] < bench_sample.REL_TOL_FP32
    text = md.read_text()
    assert text.count("<!-- bench_train:begin -->") == 1 and "<!-- bench_sample:end -->" in text
    assert "| ours |" in text and "| release |" in text
