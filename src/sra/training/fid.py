"""FID while training: at chosen steps the EMA draws K samples from a fixed, world-size-invariant
seed set (every process its share of the batches), and they are scored with the code of
``sra eval`` — Inception pool features → FID against the reference statistics (computed once and
cached beside the reference), and the Inception Score. On the bundled digits the project's digit
classifier scores them instead (FD and class accuracy), so the laptop demo has a quality curve.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from sra.atomic import atomic_write_json
from sra.data.base import DataInfo
from sra.errors import SraError
from sra.models import ModelConfig
from sra.sampling import SamplerConfig
from sra.sampling.decode import ImageDecoder
from sra.sampling.fixed import sample_batch
from sra.sampling.seeding import batch_ranges, make_labels

log = logging.getLogger("sra.train")
EVAL_DIGITS_FILE = "eval_digits.json"  # the end-of-run digits metric (--eval-samples)


@dataclass(frozen=True)
class FIDConfig:
    """``--fid-*``: when and how the run scores its EMA samples."""

    every: int = 0  # optimizer steps between evaluations (0: off)
    samples: int = 10_000  # K
    ref: str | None = None  # reference batch: file, registry name, hf:// or URL (not for digits)
    batch_size: int = 64  # per process; fixes the batches, so results do not depend on processes
    sampler: SamplerConfig = SamplerConfig(mode="sde", steps=250)  # the paper's no-guidance FID
    seed: int = 0
    inception_weights: str | None = None  # None: torch-fidelity's TF port (registry default)

    def __post_init__(self) -> None:
        if self.every < 0 or self.samples < 2 or self.batch_size < 1:
            raise SraError(f"--fid-every must be ≥ 0, --fid-samples ≥ 2 and --fid-batch-size ≥ 1; "
                           f"got {self.every}, {self.samples}, {self.batch_size}")


class QualityProbe:
    """Scores the EMA at a step. Every process calls it (collectives inside); the main process
    gets the record, the others None."""

    def __init__(self, cfg: FIDConfig, acc, model_cfg: ModelConfig, info: DataInfo, path_type: str,
                 vae: str, digits: bool) -> None:
        if not digits and cfg.ref is None:
            raise SraError("--fid-every needs --fid-ref (a reference batch: a file, imagenet256, "
                           "imagenet512, hf://… or a URL)")
        self.cfg, self.acc, self.digits = cfg, acc, digits
        sampler = cfg.sampler
        if model_cfg.family == "DiT" and sampler.mode not in ("ddpm", "ddim"):
            sampler = replace(sampler, mode="ddpm")
        self.sampler = replace(sampler, path_type=path_type)
        self.labels = make_labels(cfg.seed, cfg.samples, model_cfg.num_classes, "balanced")
        self.decoder = ImageDecoder(info, vae=vae, device=acc.device)
        from sra.artefacts import ARTEFACTS
        from sra.eval.inception import INCEPTION_URL

        weights = cfg.inception_weights or INCEPTION_URL
        # A registry name means its URL: the reference-statistics cache is keyed by it.
        self.weights = ARTEFACTS[weights].url if weights in ARTEFACTS else weights
        self._ref_stats: dict | None = None
        self._net = None

    def prepare(self) -> None:
        """Fetch and compute now what the first evaluation would: the VAE and Inception network
        (every process: each decodes and scores its share; the main process first, so a download
        happens once), the reference statistics or the digit classifier (main process). Called
        before the first step, so no process waits in a training collective meanwhile."""
        acc = self.acc
        with acc.main_process_first():
            self.decoder.load()
            if not self.digits:
                self._inception_net()
        if acc.is_main_process:
            if self.digits:
                from sra.eval.digits import load_digits_classifier

                load_digits_classifier()  # trained and cached on first use
            else:
                self.reference_statistics()
        acc.wait_for_everyone()

    # -- the samples ----------------------------------------------------------------------------
    @torch.no_grad()
    def my_images(self, ema: nn.Module) -> list[tuple[int, np.ndarray]]:
        """(batch index, uint8 (n, H, W, 3)) for this process's batches k ≡ rank (mod world)."""
        acc, cfg = self.acc, self.cfg
        out = []
        for k, (start, stop) in enumerate(batch_ranges(cfg.samples, cfg.batch_size)):
            if k % acc.num_processes != acc.process_index:
                continue
            x = sample_batch(ema, seed=cfg.seed, batch=k, indices=range(start, stop),
                             labels=self.labels[start:stop], sampler=self.sampler,
                             device=acc.device, autocast=acc.autocast)
            out.append((k, self.decoder(x)))
        return out

    def images(self, ema: nn.Module) -> np.ndarray:
        """All K samples as uint8 (K, H, W, 3), in index order (single process: for tests and
        for writing them out)."""
        return np.concatenate([imgs for _, imgs in sorted(self.my_images(ema))])

    # -- scoring --------------------------------------------------------------------------------
    def __call__(self, ema: nn.Module, step: int) -> dict | None:
        """The step's record on the main process: ``fid``/``inception_score`` or
        ``digits_fd``/``digits_acc``, plus the sample count and the seconds it took."""
        from accelerate.utils import gather_object

        t0 = time.perf_counter()
        mine = self.my_images(ema)
        if self.digits:
            parts = gather_object([(k, imgs) for k, imgs in mine])  # tiny images: gather them
            rec = self._score_digits(parts) if self.acc.is_main_process else None
        else:
            feats = [(k, *self._inception(imgs)) for k, imgs in mine]  # features on every process
            parts = gather_object(feats)
            rec = self._score_inception(parts) if self.acc.is_main_process else None
        if rec is not None:
            rec.update(step=step, fid_samples=self.cfg.samples,
                       fid_seconds=round(time.perf_counter() - t0, 3))
            log.info("step %d quality of %d EMA samples: %s", step, self.cfg.samples,
                     {k: v for k, v in rec.items() if k not in ("step",)})
        return rec

    def _score_digits(self, parts: list) -> dict:
        from sra.eval.digits import digits_metrics

        images = np.concatenate([imgs for _, imgs in sorted(parts, key=lambda p: p[0])])
        m = digits_metrics(images, self.labels)
        return {"digits_fd": m["fd"], "digits_acc": m["acc"]}

    def _inception_net(self):
        if self._net is None:
            from sra.eval.inception import InceptionFeatures

            self._net = InceptionFeatures(self.weights, device=self.acc.device)
        return self._net

    def _inception(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pool (n, 2048), logits (n, 1008)) of uint8 (n, H, W, 3) images."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2)  # (n, 3, H, W) uint8
        out = self._inception_net()(x)
        return out["pool"].cpu().numpy(), out["logits"].cpu().numpy()

    def _score_inception(self, parts: list) -> dict:
        from sra.eval import metrics as M

        parts = sorted(parts, key=lambda p: p[0])  # sample order: IS splits are taken in order
        pool = np.concatenate([p[1] for p in parts])
        logits = np.concatenate([p[2] for p in parts])
        mu, sigma = M.feature_statistics(pool)
        ref = self.reference_statistics()
        return {"fid": M.frechet_distance(mu, sigma, ref["mu"], ref["sigma"]),
                "inception_score": M.inception_score(logits, M.IS_SPLIT_SIZE)}

    def reference_statistics(self) -> dict:
        """The reference's pool (mu, sigma): as stored in the npz, else from its images — cached
        beside it by ``sra eval``'s code, and kept in memory for the run."""
        if self._ref_stats is None:
            from sra.artefacts import resolve
            from sra.data.adm_npz import check_reference_npz
            from sra.eval.evaluate import EvalConfig, batch_activations, reference_statistics
            from sra.eval.inception import POOL_DIM, SPATIAL_DIM, weights_id

            ref = check_reference_npz(resolve(self.cfg.ref, what="--fid-ref"), (POOL_DIM, SPATIAL_DIM))
            ecfg = EvalConfig(samples=ref, ref=ref, inception_weights=self.weights, progress=False)
            acts = batch_activations(ref, self._inception_net, weights_id(self.weights), ecfg,
                                     "reference")
            self._ref_stats, _ = reference_statistics(ref, acts)
        return self._ref_stats


def evaluated(run_dir: Path, step: int) -> bool:
    """Whether ``eval_digits.json`` already holds ``step``'s metric (a rerun of a complete run)."""
    try:
        return json.loads((run_dir / EVAL_DIGITS_FILE).read_text())["step"] == step
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_eval_digits(run_dir: Path, step: int, rec: dict, sampler: SamplerConfig) -> Path:
    """``eval_digits.json``: the end-of-run digits metric, with the sampler that made it."""
    n = rec["fid_samples"]
    return atomic_write_json(run_dir / EVAL_DIGITS_FILE, {
        "step": step, "num_samples": n, "fd": rec["digits_fd"], "acc": rec["digits_acc"], "n": n,
        "sampler": sampler.to_dict()})
