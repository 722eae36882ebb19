"""Data pipeline benchmark: packed open time, random-access reads (packed vs per-file .npy), and
VAE encode throughput with a tiny VAE on CPU.

    .venv/bin/python benchmarks/bench_data.py --workdir /tmp/sra-bench --out results.json

Everything synthetic is written under ``--workdir`` and deleted at the end (``--keep`` keeps it).
Numbers are machine-dependent; the script prints JSON and a markdown table.

1. open: a packed dataset of 1.28 M samples of 8×32×32 float32 (42 GB of shards, created
   sparse with ``np.lib.format.open_memmap``, no bytes written) opened through the real
   ``PackedLatentDataset`` path.
2. random access: the same N (≥ 50k) samples written in the release per-file layout and packed;
   reads of random samples through each dataset's ``__getitem__`` (each returns an owned
   tensor), page cache warm and cold (evicted per file with ``posix_fadvise(DONTNEED)``: only
   this benchmark's files), and the DataLoader path (batched fetch + default collate). The
   packed shards are also read with ``os.preadv`` for comparison with the memory maps.
3. encode: a tiny ``AutoencoderKL`` (from a config, ``save_pretrained`` → ``from_pretrained``) on
   CPU, batched as ``sra preprocess encode`` does vs one image at a time as the release does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

import numpy as np

SAMPLE_SHAPE = (8, 32, 32)  # 256 px SD-VAE moments
OPEN_SAMPLES = 1_281_167  # ImageNet-1k train
OPEN_SHARD = 20_000


def _evict(paths) -> None:
    """Drop the page cache of these files only (so other work on the machine is untouched)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_open(root: str, repeats: int) -> dict:
    from sra.data.formats import moments_info, shard_name
    from sra.data.packed import PackedLatentDataset, write_packed_header

    os.makedirs(root, exist_ok=True)
    shards, left, k = [], OPEN_SAMPLES, 0
    while left > 0:
        rows = min(OPEN_SHARD, left)
        mm = np.lib.format.open_memmap(os.path.join(root, shard_name(k)), mode="w+",
                                       dtype=np.float32, shape=(rows, *SAMPLE_SHAPE))  # sparse
        del mm
        shards.append((shard_name(k), rows))
        left, k = left - rows, k + 1
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, OPEN_SAMPLES)
    info = moments_info(SAMPLE_SHAPE, 1000)
    write_packed_header(root, shards, labels, np.arange(OPEN_SAMPLES), info, SAMPLE_SHAPE)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        ds = PackedLatentDataset(root)
        times.append(time.perf_counter() - t)
        assert len(ds) == OPEN_SAMPLES
    # A fresh interpreter: imports included (what `sra train` pays before the first step).
    code = ("import time; t=time.perf_counter(); from sra.data import build_dataset; "
            f"d=build_dataset({root!r}); print(time.perf_counter()-t, len(d))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    fresh = float(out.stdout.split()[0])
    return {"samples": OPEN_SAMPLES, "shards": len(shards), "logical_gb": round(
        OPEN_SAMPLES * int(np.prod(SAMPLE_SHAPE)) * 4 / 1e9, 1),
        "open_s_best": min(times), "open_s_median": float(np.median(times)),
        "fresh_process_import_and_open_s": fresh}


def _write_release(root: str, data_rng: np.random.Generator, n: int) -> list[str]:
    from sra.data.formats import latent_name

    paths, entries = [], []
    for k in range(n):
        path = os.path.join(root, latent_name(k))
        if k % 1000 == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        np.save(path, data_rng.standard_normal(SAMPLE_SHAPE, dtype=np.float32))
        paths.append(path)
        entries.append([latent_name(k), int(k % 1000)])
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"labels": entries}, f)
    return paths


class _PreadReader:
    """The packed shards read with one ``os.preadv`` per sample into a fresh array: the
    alternative to the dataset's memory maps, measured for comparison."""

    def __init__(self, packed):
        import bisect

        import torch

        self._bisect, self._torch = bisect.bisect_right, torch
        maps = packed.memmaps()
        self.offsets = [int(m.offset) for m in maps]
        self.fds = [os.open(m.filename, os.O_RDONLY) for m in maps]
        self.shape, self.row_bytes = packed.sample_shape, int(np.prod(packed.sample_shape)) * 4
        self.starts, self.labels = packed._starts, packed.labels

    def __getitem__(self, i: int):
        k = self._bisect(self.starts, i) - 1
        out = np.empty(self.shape, dtype=np.float32)
        os.preadv(self.fds[k], [out], self.offsets[k] + (i - self.starts[k]) * self.row_bytes)
        return self._torch.from_numpy(out), int(self.labels[i])


def _time_reads(ds, order: np.ndarray) -> float:
    """Seconds per sample of ``ds[i]`` (each returns an owned float32 tensor)."""
    t = time.perf_counter()
    for i in order:
        ds[int(i)]
    return (time.perf_counter() - t) / len(order)


def _time_batches(ds, order: np.ndarray, batch: int) -> float:
    """Seconds per sample of what a single-process DataLoader does: fetch a batch + collate."""
    from torch.utils.data import default_collate

    fetch = getattr(ds, "__getitems__", None)
    t = time.perf_counter()
    for s in range(0, len(order), batch):
        idx = order[s : s + batch].tolist()
        default_collate(fetch(idx) if fetch else [ds[i] for i in idx])
    return (time.perf_counter() - t) / len(order)


def bench_random_access(root: str, n: int, reads: int, with_zip: bool, rounds: int,
                        batch: int) -> dict:
    from sra.data.release import ReleaseLatentDataset, pack_release

    rel = os.path.join(root, "vae-sd")
    t = time.perf_counter()
    rel_paths = _write_release(rel, np.random.default_rng(1), n)
    write_release_s = time.perf_counter() - t
    t = time.perf_counter()
    packed = pack_release(rel, os.path.join(root, "packed"), progress=False)
    pack_s = time.perf_counter() - t
    t = time.perf_counter()
    release = ReleaseLatentDataset(rel)
    release_open_s = time.perf_counter() - t
    packed_files = [os.path.join(packed.path, f) for f in os.listdir(packed.path)]
    rng = np.random.default_rng(2)
    res: dict = {"samples": n, "reads": reads, "rounds": rounds, "batch": batch,
                 "write_release_s": write_release_s, "pack_from_release_s": pack_s,
                 "release_open_s": release_open_s}
    # Correctness first: the two layouts hold the same rows.
    for i in rng.integers(0, n, 100):
        assert np.array_equal(packed.read(int(i)), release.read(int(i)))
    datasets = {"release_dir": release, "packed": packed, "packed_pread": _PreadReader(packed)}
    files = {"release_dir": rel_paths, "packed": packed_files, "packed_pread": packed_files}
    if with_zip:  # the release's vae-sd is often a ZIP: same files, stored uncompressed
        zpath = os.path.join(root, "vae-sd.zip")
        t = time.perf_counter()
        with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED) as zf:
            for name in ["dataset.json"] + list(release.names):
                zf.write(os.path.join(rel, name), name)
        res["write_release_zip_s"] = time.perf_counter() - t
        datasets["release_zip"] = ReleaseLatentDataset(zpath)
        files["release_zip"] = [zpath]

    # Cold page cache first (evicted per file), one pass per layout on fresh random indices.
    for name, ds in datasets.items():
        _evict(files[name])
        res[f"{name}_cold_us_per_sample"] = _time_reads(ds, rng.integers(0, n, reads)) * 1e6
    # Page cache warm, maps untouched by this process (a fresh DataLoader worker's situation).
    for paths in files.values():
        for p in paths:
            with open(p, "rb") as f:  # pull whole files into the page cache
                while f.read(1 << 24):
                    pass
    order = rng.integers(0, n, reads)
    from sra.data.packed import PackedLatentDataset

    fresh = PackedLatentDataset(packed.path)  # new maps: every page faults once in this process
    res["packed_first_touch_us_per_sample"] = _time_reads(fresh, order) * 1e6
    res["packed_pread_first_touch_us_per_sample"] = _time_reads(_PreadReader(packed), order) * 1e6
    # Warm: every sample read once, then rounds interleaved across layouts (load on a shared
    # machine hits all layouts alike); the median round is reported.
    for ds in datasets.values():
        _time_reads(ds, np.arange(n))
    warm: dict = {name: [] for name in datasets}
    batched: dict = {name: [] for name in datasets}
    for _ in range(rounds):
        order = rng.integers(0, n, reads)
        for name, ds in datasets.items():
            warm[name].append(_time_reads(ds, order) * 1e6)
            if name != "packed_pread":
                batched[name].append(_time_batches(ds, order, batch) * 1e6)
    for name in datasets:
        res[f"{name}_warm_us_per_sample"] = float(np.median(warm[name]))
        res[f"{name}_warm_rounds_us"] = [round(x, 2) for x in warm[name]]
        if batched[name]:
            res[f"{name}_batched_warm_us_per_sample"] = float(np.median(batched[name]))
    for cache in ("warm", "cold", "batched_warm"):
        base = res[f"packed_{cache}_us_per_sample"]
        res[f"speedup_{cache}"] = res[f"release_dir_{cache}_us_per_sample"] / base
        if with_zip:
            res[f"speedup_vs_zip_{cache}"] = res[f"release_zip_{cache}_us_per_sample"] / base
    return res


def bench_encode(root: str, n: int, resolution: int) -> dict:
    import torch
    from PIL import Image

    from sra.data.encode import encode_images
    from sra.data.encode_config import EncodeConfig
    from sra.data.formats import image_name
    from sra.data.vae import encode_moments, load_vae, save_tiny_vae

    vae_path = save_tiny_vae(os.path.join(root, "tiny-vae"))
    src = os.path.join(root, "images")
    rng = np.random.default_rng(3)
    entries = []
    for i in range(n):
        p = os.path.join(src, image_name(i))
        os.makedirs(os.path.dirname(p), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(
            p, compress_level=0)
        entries.append([image_name(i), i % 10])
    with open(os.path.join(src, "dataset.json"), "w") as f:
        json.dump({"labels": entries}, f)
    out: dict = {"images": n, "resolution": resolution, "threads": torch.get_num_threads()}
    for batch, workers in ((8, 1), (64, 1), (64, 0)):
        dest = os.path.join(root, f"lat-b{batch}-w{workers}")
        rep = encode_images(EncodeConfig(source=src, dest=dest, vae=vae_path, batch_size=batch,
                                         workers=workers, progress=False))
        out[f"pipeline_batch{batch}_workers{workers}_img_s"] = rep.images_per_second
    # The VAE alone (no file I/O): one image per call as the release does, vs batches.
    vae = load_vae(vae_path)
    px = torch.from_numpy(rng.integers(0, 256, (64, 3, resolution, resolution), dtype=np.uint8))
    encode_moments(vae, px[:2])
    for batch in (1, 8, 64):
        t = time.perf_counter()
        for s in range(0, len(px), batch):
            encode_moments(vae, px[s : s + batch])
        out[f"vae_only_batch{batch}_img_s"] = len(px) / (time.perf_counter() - t)
    return out


def _markdown(results: dict) -> str:
    o, r, e = results["open"], results["random_access"], results["encode"]
    lines = [
        "| measurement | value |", "|---|---|",
        f"| open packed, {o['samples']:,} × 8×32×32 ({o['shards']} shards, {o['logical_gb']} GB) "
        f"| {o['open_s_best'] * 1e3:.1f} ms (median {o['open_s_median'] * 1e3:.1f} ms; fresh "
        f"process incl. imports {o['fresh_process_import_and_open_s']:.2f} s) |",
    ]
    labels = {"warm": "`ds[i]`, page cache warm", "cold": "`ds[i]`, page cache cold",
              "batched_warm": f"batch of {r['batch']} + collate (DataLoader path), warm"}
    for cache, what in labels.items():
        lines.append(
            f"| random read of {r['samples']:,} samples, {what}: per-file .npy vs packed "
            f"| {r[f'release_dir_{cache}_us_per_sample']:.1f} µs vs "
            f"{r[f'packed_{cache}_us_per_sample']:.1f} µs per sample → "
            f"**{r[f'speedup_{cache}']:.1f}×** |")
        if f"release_zip_{cache}_us_per_sample" in r:
            lines.append(
                f"| same, release ZIP vs packed | {r[f'release_zip_{cache}_us_per_sample']:.1f} µs vs "
                f"{r[f'packed_{cache}_us_per_sample']:.1f} µs → **{r[f'speedup_vs_zip_{cache}']:.1f}×** |")
    lines += [
        f"| packed, first touch of the maps in a process (page cache warm) | "
        f"{r['packed_first_touch_us_per_sample']:.1f} µs per sample |",
        f"| packed read with os.preadv instead of maps: warm / first touch / cold | "
        f"{r['packed_pread_warm_us_per_sample']:.1f} / {r['packed_pread_first_touch_us_per_sample']:.1f}"
        f" / {r['packed_pread_cold_us_per_sample']:.1f} µs per sample |",
        f"| open release dir ({r['samples']:,} files) | {r['release_open_s']:.2f} s |",
        f"| encode pipeline, tiny VAE, CPU, {e['resolution']} px (PNG decode → VAE → vae-sd + packed): "
        f"batch 8 / 64 with 1 decode worker, batch 64 in-process | "
        f"{e['pipeline_batch8_workers1_img_s']:.1f} / {e['pipeline_batch64_workers1_img_s']:.1f} / "
        f"{e['pipeline_batch64_workers0_img_s']:.1f} img/s |",
        f"| tiny VAE alone, CPU, batch 1 (release) / 8 / 64 | {e['vae_only_batch1_img_s']:.1f} / "
        f"{e['vae_only_batch8_img_s']:.1f} / {e['vae_only_batch64_img_s']:.1f} img/s |",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/sra-bench-data", help="scratch folder (deleted after)")
    ap.add_argument("--samples", type=int, default=50_000, help="samples for the random-access test")
    ap.add_argument("--reads", type=int, default=20_000, help="random reads per layout and cache state")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved warm rounds (median reported)")
    ap.add_argument("--batch", type=int, default=256, help="batch size of the DataLoader-path timing")
    ap.add_argument("--open-repeats", type=int, default=5, help="repetitions of the open timing")
    ap.add_argument("--encode-images", type=int, default=256, help="images for the encode test")
    ap.add_argument("--encode-resolution", type=int, default=256, help="image side for the encode test")
    ap.add_argument("--no-zip", action="store_true", help="skip the release-ZIP read measurement")
    ap.add_argument("--out", default=None, help="also write the JSON results here")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic data")
    args = ap.parse_args(argv)
    if os.path.exists(args.workdir):
        raise SystemExit(f"--workdir {args.workdir} exists; pass a new folder")
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    try:
        results["open"] = bench_open(os.path.join(args.workdir, "open"), args.open_repeats)
        shutil.rmtree(os.path.join(args.workdir, "open"))
        results["random_access"] = bench_random_access(
            os.path.join(args.workdir, "ra"), args.samples, args.reads, with_zip=not args.no_zip,
            rounds=args.rounds, batch=args.batch)
        shutil.rmtree(os.path.join(args.workdir, "ra"))
        results["encode"] = bench_encode(os.path.join(args.workdir, "enc"), args.encode_images,
                                         args.encode_resolution)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    text = json.dumps(results, indent=1)
    print(text)
    print()
    print(_markdown(results))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
