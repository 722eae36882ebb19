"""Smoke test of the throughput benchmarks (benchmarks/bench_train.py, bench_sample.py) and of the
release's compute path they re-create (benchmarks/release_path.py)."""

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
    flops = _load("flops")
    bench_train = _load("bench_train")
    bench_sample = _load("bench_sample")
    from sra.models import model_config

    # The analytic FLOP counter reproduces the papers' 118.6 GMAC for SiT-XL/2 at 256 px, and
    # the SRA step counts 3 student forwards (head included) plus the teacher's blocks 1..t.
    xl = model_config("SiT-XL/2", input_size=32, use_head=False)
    assert abs(flops.forward_macs(xl) / 1e9 - flops.SIT_XL2_256_GMAC) < 0.05
    step = flops.train_step_flops(model_config("SiT-XL/2", input_size=32), 20)
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


def test_release_teacher_runs_everything_and_release_ema_matches_ours():
    release_path = _load("release_path")
    from sra.models import ModelConfig, build_model
    from sra.training.ema import make_ema, update_ema

    torch.manual_seed(0)
    model = build_model(ModelConfig(depth=3, hidden_size=32, num_heads=2, patch_size=2,
                                    input_size=8, in_channels=4, num_classes=10)).eval()
    ran_final = []
    model.final_layer.register_forward_hook(lambda *a: ran_final.append(True))
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    early = model(x, t, y, return_blocks=(2,), stop_after=2)
    assert not ran_final
    # the release's teacher ignores the early stop: same features, final layer run, fp32 output
    full = release_path.ReleaseTeacher(model, "cpu")(x, t, y, return_blocks=(2,), stop_after=2)
    assert ran_final and full.output is not None and full.output.dtype == torch.float32
    torch.testing.assert_close(full.features[2], early.features[2])

    ema_a, ema_b = make_ema(model), make_ema(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    update_ema(ema_a, model, 0.9)
    release_path.update_ema_loop(ema_b, model, 0.9)
    for a, b in zip(ema_a.parameters(), ema_b.parameters()):
        torch.testing.assert_close(a, b)


def test_bench_arms_times_every_arm_of_a_regime(tmp_path):
    """The side-by-side step cost of a study regime's arms (benchmarks/bench_arms.py) on a tiny
    regime file: every arm timed, ratios to the baseline."""
    bench_arms = _load("bench_arms")
    regime = tmp_path / "tiny.toml"
    regime.write_text('baseline = "vanilla"\n[flags]\ndepth = 4\nhidden-size = 32\nnum-heads = 2\n'
                      'batch-size = 8\n[arms.vanilla]\npreset = "digits-vanilla"\n'
                      '[arms.sra]\npreset = "digits"\n')
    threads = torch.get_num_threads()
    try:
        res = bench_arms.main(["--regime", str(regime), "--threads", "1", "--warmup", "0",
                               "--repeats", "2", "--json", str(tmp_path / "arms.json")])
    finally:
        torch.set_num_threads(threads)
    arms = res["cases"][0]["arms"]
    assert list(arms) == ["vanilla", "sra"] and arms["vanilla"]["ratio"] == 1.0
    assert arms["sra"]["n"] == 2 and arms["sra"]["median_s"] > 0
    assert (tmp_path / "arms.json").is_file()
