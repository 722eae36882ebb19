"""benchmarks/gpu_check.py's CPU dry run (``--device cpu --tiny``): every section runs through
the real code and leaves numbers; the full mode refuses a machine without CUDA in one line;
diffusers is never imported, and a missing torch-fidelity only skips the Inception section."""

import contextlib
import importlib
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The dry run, in this process (a fresh one would spend seconds importing torch), with
    diffusers blocked: importing it anywhere in the check fails the run. What the check sets
    for itself (no GPU for accelerate, one thread, accelerate's state) is undone afterwards."""
    gpu_check, gpu_check_train = _load("gpu_check"), _load("gpu_check_train")
    out = tmp_path_factory.mktemp("gpu_check") / "x.json"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as table:
        mp.setenv("CUDA_VISIBLE_DEVICES", "")
        mp.setitem(sys.modules, "diffusers", None)
        try:
            gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out)])
        finally:
            torch.set_num_threads(threads)
            gpu_check_train.fresh_accelerator_state()
    assert out.with_suffix(".md").read_text() + "\n" == table.getvalue()  # also as a file
    return json.loads(out.read_text()), table.getvalue()


def _positive(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def test_every_section_runs_and_leaves_numbers(dry_run):
    data, _ = dry_run
    secs = data["sections"]
    assert list(secs) == list(_load("gpu_check").SECTIONS)
    assert all(_positive(s["section_s"]) for s in secs.values())
    train = secs["train"]["cases"]
    assert [(c["arm"], c["batch"]) for c in train] == [
        (arm, b) for arm in ("SiT-XL/2 SRA", "SiT-B/2 SRA", "SiT-B/2 DTS+AS") for b in (2, 4)]
    for c in train + secs["train_compile"]["cases"]:
        assert c["status"] == "ok", c
        assert _positive(c["median_s"], c["images_per_s"], c["tflops_per_s"], c["peak_mem_bytes"],
                         c["gflop_per_image"]) and math.isfinite(c["loss"])
        assert c["mfu"] is None  # no peak is known for a CPU
    assert secs["train_compile"]["cases"][0]["compile"] is True
    assert [d["status"] for d in secs["train"]["dts_overhead"]] == ["ok", "ok"]
    assert all(math.isfinite(d["overhead_pct"]) for d in secs["train"]["dts_overhead"])
    fp16 = secs["fp16"]
    assert fp16["status"] == "ok" and fp16["steps"] == 3 and fp16["divergent"] == 0
    assert fp16["overflows"] == 0 and fp16["grad_scaler"] is False  # no scaler on CPU
    for path in secs["sdpa"]["paths"].values():
        assert path["status"] == "ok" and path["forward"] and path["backward"], path
        assert path["flash_only"] == "ok"  # CPU SDPA has a flash kernel too


def test_sampling_inception_and_resume_figures(dry_run):
    secs = dry_run[0]["sections"]
    sampling = secs["sampling"]
    evaluations = sampling["plain_evaluations"] + sampling["guided_evaluations"]
    assert evaluations == sampling["sampler"]["steps"]
    assert sampling["guided_evaluations"] > 0 and sampling["plain_evaluations"] > 0
    assert [(c["batch"], c["precision"]) for c in sampling["cases"]] == [
        (b, p) for b in (2, 4, 8) for p in ("fp32+tf32", "bf16")]
    for c in sampling["cases"]:
        assert c["status"] == "ok" and _positive(c["plain_eval_s"], c["guided_eval_s"],
                                                 c["estimated_run_s"], c["images_per_s"])
    diff = sampling["difference"]
    assert diff["status"] == "ok" and diff["fp32+tf32_max_abs_diff"] == 0.0  # no TF32 on a CPU
    assert _positive(diff["bf16_max_abs_diff"]) and diff["bf16_rel_diff"] < 0.1
    inc = secs["inception"]
    assert inc["status"] == "ok"
    assert _positive(inc["network_images_per_s"], inc["eval_images_per_s"])
    res = secs["resume"]
    assert res["status"] == "ok" and res["resumed_at"] == 2
    # on a CPU the resumed run is bit-identical (tests/test_train.py kills a run to show it too)
    for k in ("resume_max_abs_diff_model", "resume_max_abs_diff_ema", "rerun_max_abs_diff_model",
              "rerun_max_abs_diff_ema"):
        assert res[k] == 0.0, k
    assert _positive(res["moved_after_cut_max_abs"])


def test_the_table_names_the_device_and_every_section(dry_run):
    data, stdout = dry_run
    assert stdout.startswith("### gpu_check: CPU")
    for title in ("training, eager", "training, torch.compile", "fp16 + GradScaler", "SDPA path",
                  "sampling paper-256", "Inception", "resume:"):
        assert f"| {title}" in stdout, title
    assert "skipped" not in stdout and "error" not in stdout
    assert data["machine"]["mode"] == "tiny dry run"


def test_full_mode_refuses_a_machine_without_cuda(tmp_path):
    gpu_check = _load("gpu_check")
    with pytest.raises(SystemExit, match="^gpu_check: full sizes need a CUDA GPU"):
        gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "x.json")])
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--out", str(tmp_path / "x.json")])
    msg = str(exc.value)
    assert msg.startswith("gpu_check: no CUDA device is available") and "\n" not in msg
    assert not (tmp_path / "x.json").exists()


def test_inception_is_skipped_without_torch_fidelity(tmp_path, monkeypatch):
    base, infer = _load("gpu_check_base"), _load("gpu_check_infer")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import torch_fidelity now fails
    ctx = base.Context(torch.device("cpu"), True, tmp_path, base.Budget(10), None,
                       log=lambda msg: None)
    assert infer.section_inception(ctx) == {"status": "skipped: torch-fidelity missing"}
