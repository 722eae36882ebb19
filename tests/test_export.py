"""`sra export`: a run → an upload-ready folder; loading it (from disk or hf://) samples exactly
what the run samples; the model card holds the run's numbers and the sample command."""

import json

import numpy as np

from sra.cli import main

TINY = ["--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--block-out-s", "1",
        "--block-out-t", "2", "--batch-size", "32", "--max-train-steps", "3", "--checkpoint-steps", "3",
        "--grid-samples", "4", "--eval-samples", "20", "--report-to", "none"]
SAMPLE = ["--mode", "heun", "--num-steps", "3", "--num-samples", "6", "--per-proc-batch-size", "4",
          "--grid-size", "0", "--cpu", "--no-progress"]


def test_export_round_trip_is_bit_identical_and_the_card_has_the_numbers(tmp_path, capsys):
    assert main(["train", "--preset", "digits", *TINY, "--output-dir", str(tmp_path)]) == 0
    run = tmp_path / "digits-sra"
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--repo", "me/digits"]) == 0
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "sra-export-v1" and cfg["step"] == 3
    assert cfg["sampler"]["mode"] == "heun"  # the digits run's own grid sampler
    card = (out / "README.md").read_text()
    fd = json.loads((run / "eval_digits.json").read_text())["fd"]
    assert str(fd)[:6] in card and "sra sample --ckpt hf://me/digits" in card
    assert "block-1 tokens" in card and "3 optimizer steps" in card
    # export → load → sample: bit-identical to sampling the run itself
    assert main(["sample", "--ckpt", str(run), *SAMPLE, "--output-dir", str(tmp_path / "a")]) == 0
    assert main(["sample", "--ckpt", str(out), *SAMPLE, "--output-dir", str(tmp_path / "b")]) == 0
    a = np.load(tmp_path / "a" / "samples.npz")
    b = np.load(tmp_path / "b" / "samples.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    # without sampler flags an export samples with the sampler its card recommends
    assert main(["sample", "--ckpt", str(out), "--num-samples", "2", "--per-proc-batch-size", "2",
                 "--grid-size", "0", "--cpu", "--no-progress", "--output-dir", str(tmp_path / "c")]) == 0
    used = json.loads((tmp_path / "c" / "sampling_config.json").read_text())["sampler"]
    assert used["mode"] == "heun" and used["steps"] == cfg["sampler"]["steps"]


def test_export_of_something_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err


def test_an_export_on_the_hub_loads_by_hf_address(tmp_path, monkeypatch):
    """The same folder served as a Hub repo (local server): --ckpt hf://owner/repo samples alike."""
    import torch

    from test_artefacts import _Server
    from sra import checkpoints as ckpts

    assert main(["train", "--preset", "digits", *TINY, "--eval-samples", "0",
                 "--output-dir", str(tmp_path)]) == 0
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "digits-sra"), "--out", str(out)]) == 0
    server = _Server()
    try:
        for f in out.iterdir():
            server.files[f"/me/digits/resolve/main/{f.name}"] = f.read_bytes()
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        model, info = ckpts.load_model("hf://me/digits")
        local, _ = ckpts.load_model(out)
        assert info["sampler"]["mode"] == "heun"
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                       local.state_dict().values()))
    finally:
        server.close()
