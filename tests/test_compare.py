"""`sra compare` on hand-written run directories with hand-computed answers (means, SE, paired and
Welch Δ, equal-compute interpolation, late window, 2-SE marks, runs still training or without the
metric, a metric measured differently, arm naming), and end to end on three tiny real runs."""

import json
import math

import pytest
import torch

from sra.cli import main
from sra.compare import compare
from sra.compare.runs import compute_at, metric_points, read_run
from sra.compare.stats import interp, late_count
from sra.errors import SraError

SE3 = 1 / math.sqrt(3)  # the SE of three values whose std is 1


def write_run(root, name, seed, weight=0.5, evals=None, cost=1.0, max_steps=40, last=None,
              samples=500, metric="digits_fd", compute=True, eval_compute=False, **cfg_over):
    """A run dir: config.json + metrics.jsonl with a training log record every 5 steps (up to
    ``last``) carrying compute_s = cost·step, and one ``metric`` record per ``evals`` entry."""
    run = root / name
    run.mkdir(parents=True)
    cfg = {"model": {"name": "SiT-S/4", "depth": 2, "hidden_size": 32},
           "align": {"enabled": True, "weight": weight}, "align_target": "ema",
           "loop": {"seed": seed, "max_train_steps": max_steps, "global_batch_size": 32,
                    "log_every": 5 + seed},  # run-local: differs within an arm
           "fid": {"every": 10, "samples": samples, "ref": None, "seed": 0,
                   "sampler": {"mode": "heun", "steps": 25, "path_type": "linear"}},
           "output_dir": str(root), "exp_name": name, "compute_unit": "cpu-process-s"}
    for key, value in cfg_over.items():
        section, _, field = key.partition("__")
        cfg[section][field] = value
    (run / "config.json").write_text(json.dumps(cfg))
    last = max_steps if last is None else last
    recs = []
    for step in range(5, last + 1, 5):
        recs.append({"step": step, "loss": 1.0 / step,
                     "images_seen": cfg["loop"]["global_batch_size"] * step,
                     **({"compute_s": cost * step} if compute else {})})
        if step in (evals or {}):
            q = {"step": step, metric: evals[step], "fid_samples": samples, "fid_seconds": 1.0}
            recs.append({**q, "compute_s": cost * step} if eval_compute else q)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run


BASE = {0: {10: 4.0, 20: 10.0, 30: 2.0, 40: 1.0},
        1: {10: 6.0, 20: 11.0, 30: 3.0, 40: 2.0},
        2: {10: 8.0, 20: 12.0, 30: 4.0, 40: 3.0}}
ARM = {0: {10: 3.0, 20: 7.0, 30: 2.0, 40: 1.0},
       1: {10: 4.0, 20: 8.0, 30: 3.0, 40: 2.0},
       2: {10: 8.0, 20: 10.0, 30: 4.0, 40: 4.0}}


@pytest.fixture
def two_arms(tmp_path):
    """SRA (λ 0.5, listed first) and vanilla (λ 0), seeds 0–2; SRA costs 2 s/step, vanilla 1."""
    dirs = [write_run(tmp_path, f"sra-s{s}", s, 0.5, ARM[s], cost=2.0) for s in range(3)]
    dirs += [write_run(tmp_path, f"van-s{s}", s, 0.0, BASE[s], cost=1.0) for s in range(3)]
    return dirs


def test_arms_means_se_paired_delta_and_marks(two_arms):
    cmp = compare(two_arms)
    assert [a.name for a in cmp.arms] == ["align.weight=0.5", "align.weight=0"]
    assert cmp.baseline.name == "align.weight=0"  # the arm without an alignment term
    t = cmp.tables["steps"]
    assert t.steps == [10, 20, 30, 40]
    base = t.mean["align.weight=0"][0]
    assert (base.mean, base.n) == (6.0, 3) and base.se == pytest.approx(2 * SE3)
    # step 10: Δ per seed −1, −2, 0 → −1 ± 1/√3, within 2 SE: no mark
    d10 = t.delta["align.weight=0.5"][0]
    assert d10.paired and d10.mean == pytest.approx(-1) and d10.se == pytest.approx(SE3)
    assert d10.mark() == ""
    # step 20: Δ −3, −3, −2 → −8/3 ± 1/3: beyond 2 SE, lower
    d20 = t.delta["align.weight=0.5"][1]
    assert d20.mean == pytest.approx(-8 / 3) and d20.se == pytest.approx(1 / 3) and d20.mark() == "↓"
    # late (default 1/3 of 4 evaluations → the last 2: steps 30, 40): per-seed means
    # vanilla 1.5, 2.5, 3.5; SRA 1.5, 2.5, 4.0 → Δ 0, 0, 0.5
    assert t.late == [2, 3]
    assert t.late_mean["align.weight=0"].mean == pytest.approx(2.5)
    late = t.late_delta["align.weight=0.5"]
    assert late.mean == pytest.approx(1 / 6) and late.se == pytest.approx(math.sqrt(1 / 12) / math.sqrt(3))


def test_best_point_and_where_delta_is_beyond_two_se(two_arms):
    """Best = the most favourable Δ/SE (step 20: −8/3 ± 1/3, not step 10's −1 ± 0.58; step 30's
    Δ 0 ± 0 has no SE); beyond 2 SE at equal steps: only step 20, lower; the report and JSON
    say both."""
    from sra.compare.report import markdown, step_ranges, to_json
    from sra.compare.stats import Delta, best_index, marked

    cmp = compare(two_arms)
    deltas = cmp.tables["steps"].delta["align.weight=0.5"]
    assert best_index(deltas) == 1 and marked(deltas, "↓") == [1] and marked(deltas, "↑") == []
    assert best_index(deltas, lower_is_better=False) == 3  # +1/3 ± 1/3: the best rise
    no_se = [Delta(-1.0, math.nan, 1, 1, True), Delta(-2.0, math.nan, 1, 1, True)]
    assert best_index(no_se) == 1 and best_index([]) is None
    assert step_ranges([125, 250, 375, 500, 625], [0, 2, 3, 4]) == "125, 375–625"
    row = next(line for line in markdown(cmp).splitlines() if line.startswith("| `align.weight=0.5` | 3"))
    # equal compute (SRA at half vanilla's step): Δ −7, −7, −4 at 20; +3, +3, +5 at 30; ≥ +6 at 40
    assert row.endswith("| **-2.67 ± 0.33** ↓ @ 20 | ↓ 20 | ↓ 20; ↑ 30–40 |")
    js = to_json(cmp)["tables"]["steps"]["arms"]
    assert js["align.weight=0.5"]["best"]["step"] == 20
    assert js["align.weight=0.5"]["beyond_2se"] == {"lower": [20], "higher": []}
    assert js["align.weight=0"]["best"] is None  # the baseline has no Δ


def test_late_fraction_and_welch_when_seeds_do_not_pair(tmp_path):
    dirs = [write_run(tmp_path, f"van-s{s}", s, 0.0, BASE[s]) for s in range(3)]
    dirs += [write_run(tmp_path, f"sra-s{s}", s, 0.5, {10: v, 20: v, 30: v, 40: v})
             for s, v in ((5, 5.0), (6, 7.0))]  # seeds the baseline does not have
    cmp = compare(dirs, late=0.25)
    t = cmp.tables["steps"]
    assert t.late == [3]  # ⌈0.25·4⌉ = 1: step 40 only
    d = t.delta["align.weight=0.5"][0]  # step 10: (5, 7) vs (4, 6, 8)
    assert not d.paired and d.mean == pytest.approx(0.0)
    assert d.se == pytest.approx(math.sqrt(2 / 2 + 4 / 3))
    assert late_count(8, 1 / 3) == 3 and late_count(3, 1.0) == 3 and late_count(5, 0.01) == 1


def test_equal_compute_is_interpolated_and_never_extrapolated(two_arms):
    cmp = compare(two_arms)
    t = cmp.tables["compute"]
    assert not t.unavailable and t.x == [10.0, 20.0, 30.0, 40.0]  # vanilla's compute at its evals
    assert cmp.cost["align.weight=0.5"].mean == pytest.approx(2.0)
    from sra.compare.report import markdown, to_json

    assert to_json(cmp)["arms"][0]["cost_ratio"] == pytest.approx(2.0)
    assert "| `align.weight=0.5` | 3 | 0, 1, 2 | 2.00 ± 0.00 | 2.00 |" in markdown(cmp)
    sra = {seed: vals for seed, _, vals in t.values["align.weight=0.5"]}
    # compute 10 = SRA step 5, before its first evaluation: no value; 20 = its step 10;
    # 30 = step 15, halfway between steps 10 and 20; 40 = step 20
    assert sra[0] == [None, 3.0, 5.0, 7.0]
    assert sra[2] == [None, 8.0, 9.0, 10.0]
    assert t.mean["align.weight=0.5"][2].mean == pytest.approx((5 + 6 + 9) / 3)
    d = t.delta["align.weight=0.5"][2]  # vs vanilla at step 30: 5−2, 6−3, 9−4
    assert d.paired and d.mean == pytest.approx(11 / 3)
    assert interp([0, 10], [0, 1], 10.5) is None and interp([0, 10], [0, 1], 2.5) == 0.25


def test_equal_images_when_the_batches_differ(tmp_path):
    dirs = [write_run(tmp_path, f"van-s{s}", s, 0.0, BASE[s]) for s in range(3)]
    dirs += [write_run(tmp_path, f"big-s{s}", s, 0.0, ARM[s], loop__global_batch_size=64)
             for s in range(3)]
    dirs[3].joinpath("metrics.jsonl").write_text(  # records without images_seen: step × batch
        "".join(line for line in dirs[3].joinpath("metrics.jsonl").read_text().splitlines(True)
                if "loss" not in line))
    cmp = compare(dirs)
    t = cmp.tables["images"]
    assert t.x == [320.0, 640.0, 960.0, 1280.0]  # the baseline's 32 images per step
    big = {seed: vals for seed, _, vals in t.values["loop.global_batch_size=64"]}
    # 640 images = step 10 at 64 per step; 960 = step 15, between its evaluations at 10 and 20
    assert big[0] == [None, 3.0, 5.0, 7.0] and big[1] == [None, 4.0, 6.0, 8.0]
    assert "images" not in compare(dirs[:3]).tables  # one batch size: images = steps × 32


def test_compute_from_neighbouring_log_records(tmp_path):
    run = read_run(write_run(tmp_path, "r", 0, 0.0, {12: 1.0}, cost=1.1, last=20))
    assert compute_at(run, 12) == pytest.approx(13.2)  # between the records at steps 10 and 15
    assert compute_at(run, 3) == pytest.approx(3.3)  # from the (0, 0) anchor
    assert compute_at(run, 25) is None  # past the last record: never extrapolated


def test_run_still_training_and_runs_without_the_metric(tmp_path):
    dirs = [write_run(tmp_path, f"van-s{s}", s, 0.0, BASE[s]) for s in range(3)]
    dirs.append(write_run(tmp_path, "sra-s0", 0, 0.5, ARM[0], last=20))  # at step 20 of 40
    dirs.append(write_run(tmp_path, "no-evals", 1, 0.5, {}))  # training log only
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"loop": {"seed": 0}}))
    cmp = compare([*dirs, empty])
    assert cmp.tables["steps"].steps == [10, 20]  # the steps every run has
    assert any("sra-s0" in n and "step 20 of 40" in n for n in cmp.notes)
    assert [x.split(":")[0] for x in cmp.left_out] == [str(dirs[-1]), str(empty)]
    with pytest.raises(SraError, match="not a run directory"):
        compare([tmp_path / "nowhere"])


def test_eval_digits_adds_the_end_of_run_point_when_measured_alike(tmp_path):
    run = write_run(tmp_path, "r", 0, 0.0, {10: 3.0, 20: 2.0}, max_steps=25)
    ev = {"step": 25, "num_samples": 500, "fd": 1.5, "acc": 0.9, "n": 500}
    (run / "eval_digits.json").write_text(json.dumps(ev))
    assert [p.value for p in metric_points(read_run(run), "digits_fd")] == [3.0, 2.0, 1.5]
    (run / "eval_digits.json").write_text(json.dumps({**ev, "num_samples": 40}))
    assert [p.step for p in metric_points(read_run(run), "digits_fd")] == [10, 20]  # another count


def test_a_metric_measured_differently_is_one_line(tmp_path, capsys):
    a = write_run(tmp_path, "a", 0, 0.0, {10: 1.0})
    b = write_run(tmp_path, "b", 1, 0.0, {10: 2.0}, samples=250)
    with pytest.raises(SraError, match="--fid-samples 500 .* vs --fid-samples 250"):
        compare([a, b])
    c = write_run(tmp_path, "c", 0, 0.0, {10: 1.0}, metric="fid", fid__ref="imagenet256")
    d = write_run(tmp_path, "d", 1, 0.0, {10: 2.0}, metric="fid", fid__ref="other.npz")
    assert main(["compare", str(c), str(d), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--fid-ref imagenet256" in err


def test_naming_baseline_sizes_and_metric_choice(tmp_path):
    dirs = [write_run(tmp_path, f"van-s{s}", s, 0.0, BASE[s], metric="digits_acc") for s in range(2)]
    dirs.append(write_run(tmp_path, "wide-s0", 0, 0.0, BASE[0], metric="digits_acc",
                          model__hidden_size=64))
    with pytest.raises(SraError, match="no run has fid or digits_fd records.*one of: digits_acc, loss"):
        compare(dirs)  # the default metric is missing: the line names those there are
    cmp = compare(dirs, metric="digits_acc", name_by=["exp_name"])
    assert [a.name for a in cmp.arms] == ["van", "wide-s0"]
    assert not cmp.lower_is_better  # accuracy: higher is better
    assert any("model size" in w and "model.hidden_size: 32, 64" in w for w in cmp.warnings)
    wide = compare(dirs, metric="digits_acc", baseline="model.hidden_size=64")
    assert wide.baseline.runs[0].name == str(dirs[2])
    with pytest.raises(SraError, match="allowed: model.hidden_size=32, model.hidden_size=64"):
        compare(dirs, metric="digits_acc", baseline="nope")
    with pytest.raises(SraError, match="loop.log_every: its value differs within one arm"):
        compare(dirs, metric="digits_acc", name_by=["loop.log_every"])  # 5 + seed
    with pytest.raises(SraError, match="--name-by nope: no such config key"):
        compare(dirs, metric="digits_acc", name_by=["nope"])
    with pytest.raises(SraError, match="no run has 'fid' records; allowed: .*digits_acc"):
        compare(dirs, metric="fid")


def test_without_compute_the_axis_is_unavailable_and_outputs_are_written(tmp_path):
    dirs = [write_run(tmp_path, f"r{i}", s, w, vals[s], compute=False)
            for i, (s, w, vals) in enumerate(((0, 0.0, BASE), (1, 0.0, BASE), (0, 0.5, ARM)))]
    out = tmp_path / "out"
    assert main(["compare", *map(str, dirs), "--out", str(out)]) == 0
    js = json.loads((out / "compare.json").read_text())
    assert js["tables"]["compute"]["unavailable"].startswith("the baseline")
    assert js["baseline"] == "align.weight=0" and js["arms"][0]["seeds"] == [0, 1]
    steps = js["tables"]["steps"]["arms"]["align.weight=0.5"]
    assert steps["delta"][0] == {"mean": -1.0, "se": None, "n": 1, "n_baseline": 1,
                                 "paired": True, "mark": ""}  # 3 − 4: one pair, no SE
    md = (out / "compare.md").read_text()
    assert "| 10 | 320 | 5.00 ± 1.00 | 3.000 |" in md and "Unavailable:" in md
    assert (out / "compare.png").stat().st_size > 1000


def test_every_flag_is_documented(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    for flag in ("RUN_DIR", "--metric", "--baseline", "--name-by", "--late", "--out"):
        assert flag in text
    assert "compare.md, compare.json and compare.png" in text


# -- end to end on real runs ----------------------------------------------------------------------
TINY = ["--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--block-out-s", "1",
        "--block-out-t", "2", "--batch-size", "16", "--grid-samples", "0", "--report-to", "none",
        "--max-train-steps", "4", "--checkpoint-steps", "4", "--log-every", "2",
        "--eval-samples", "0", "--fid-every", "2", "--fid-samples", "20", "--fid-batch-size", "20"]


@pytest.fixture
def one_thread():
    """One torch and one BLAS thread: on a busy 2-core machine more only spin (the FD's sqrtm
    of a 128×128 matrix takes 1.5 s with OpenBLAS's threads, 0.03 s without)."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def test_cli_on_three_tiny_real_runs(tmp_path, capsys, monkeypatch, one_thread):
    """Two seeds of SRA and one vanilla run; compute_s comes from `sra train` itself."""
    # Each run's own curves.png (1–4 s of matplotlib a run here) is not what is tested.
    monkeypatch.setattr("sra.viz.curves.plot_curves", lambda *a, **k: None)
    runs = []
    for name, flags in (("sra-s0", ["--seed", "0"]), ("sra-s1", ["--seed", "1"]),
                        ("van-s0", ["--seed", "0", "--vanilla"])):
        assert main(["train", "--preset", "digits", *TINY, *flags, "--exp-name", name,
                     "--output-dir", str(tmp_path)]) == 0
        runs.append(str(tmp_path / name))
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert main(["compare", *runs, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    js = json.loads((out / "compare.json").read_text())
    assert js["metric"] == "digits_fd" and js["baseline"] == "align.enabled=false"
    assert [a["seeds"] for a in js["arms"]] == [[0, 1], [0]]
    steps = js["tables"]["steps"]
    assert steps["steps"] == [2, 4] and steps["late_steps"] == [4]
    fd = [r["values"] for r in steps["arms"]["align.enabled=true"]["runs"]]
    assert all(v > 0 for vals in fd for v in vals)
    # seeds 0, 1 against the baseline's seed 0 alone: no pairing, and Welch needs two baseline runs
    d = steps["arms"]["align.enabled=true"]["delta"][1]
    assert not d["paired"] and d["se"] is None and d["n"] == 2 and d["n_baseline"] == 1
    has_compute = any("compute_s" in json.loads(line) for r in runs
                      for line in open(f"{r}/metrics.jsonl"))
    compute = js["tables"]["compute"]
    assert (compute["unavailable"] is None) == has_compute
    if has_compute:  # the ratio of the arms' compute per step is what the table reports
        assert js["compute_unit"] == "cpu-process-s" and js["arms"][0]["compute_per_step"]["mean"] > 0
    assert "align.enabled=true" in printed and (out / "compare.png").is_file()
