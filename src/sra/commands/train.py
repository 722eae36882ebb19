"""``sra train``: SRA (or vanilla, or REPA) training of SiT / DiT on accelerate.

Single GPU:   accelerate launch -m sra.cli train --preset sit-xl2-256 --data-dir DATA
8 GPUs:       accelerate launch --multi_gpu --num_processes 8 -m sra.cli train ...
2 nodes × 8:  accelerate launch --multi_gpu --num_machines 2 --num_processes 16
                --machine_rank R --main_process_ip HOST --main_process_port 29500 -m sra.cli train ...
Laptop CPU:   sra train --preset digits
REPA:         --align-target encoder (presets sit-xl2-repa-256, digits-repa): block-s tokens
              through a projector toward a frozen encoder's tokens of the clean image
iREPA:        REPA with --projector conv --target-norm zscore (sit-xl2-irepa-256, digits-irepa)
Dispersive:   --dispersive-weight λ (sit-b2-dispersive, digits-dispersive): one block's raw tokens
              spread apart over the micro-batch; alone (--vanilla) or on top of SRA / REPA / DTS
"""

from __future__ import annotations

import argparse

from sra.commands._args import float_list, str2bool
from sra.errors import SraError


def sampler_preset(name: str):
    """A sampler preset by name (argparse type)."""
    from sra.sampling.config import PRESETS

    if name not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown sampler preset {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]


# flag → (dotted config path, type, help). Release flag names are kept verbatim; aliases follow.
FLAGS: list[tuple[list[str], str, object, str]] = [
    (["--model"], "model.name", str, "model name from the registry (see `sra models`)"),
    (["--depth"], "model.depth", int, "custom depth (overrides the name's)"),
    (["--hidden-size"], "model.hidden_size", int, "custom width (overrides the name's)"),
    (["--num-heads"], "model.num_heads", int, "custom head count (overrides the name's)"),
    (["--patch-size"], "model.patch_size", int, "custom patch size (overrides the name's)"),
    (["--qk-norm"], "model.qk_norm", str2bool, "LayerNorm on q and k per head"),
    (["--fused-attn"], "model.fused_attn", str2bool, "use scaled_dot_product_attention"),
    (["--align-target"], "align_target", str,
     "alignment target: ema (SRA: the EMA teacher's block-t tokens) | encoder (REPA: a frozen "
     "encoder's patch tokens of the clean image; no teacher runs)"),
    (["--encoder", "--enc-type"], "encoder_align.encoder", str,
     "REPA encoder: dinov2-vit-s14 | dinov2-vit-b14 | dinov2-vit-l14 (timm, DINOv2) | "
     "digits-classifier (the digits positive control)"),
    (["--encoder-weights"], "encoder_align.encoder_weights", str,
     "REPA: local encoder weights (.safetensors or a tensors-only .pth), for offline use; "
     "default: the library's pretrained download"),
    (["--encoder-resolution"], "encoder_align.encoder_resolution", int,
     "REPA: encoder input size (default: the encoder's own, 224 for DINOv2)"),
    (["--projector-dim"], "encoder_align.projector_dim", int,
     "REPA: hidden width P of the MLP projector"),
    (["--projector"], "encoder_align.projector", str,
     "REPA's projector: mlp (REPA: Linear–SiLU–Linear–SiLU–Linear) | conv (iREPA: one 3×3 "
     "convolution, padding 1, on the token grid from the model's width to the encoder's)"),
    (["--target-norm"], "encoder_align.target_norm", str,
     "REPA's encoder tokens: none | zscore (iREPA: (f − α·mean_T f) / (std_T f + 1e-6) per "
     "channel over the tokens, on the model's grid)"),
    (["--zscore-alpha"], "encoder_align.zscore_alpha", float,
     "--target-norm zscore: α, the share of the token mean removed (iREPA: 0.6)"),
    (["--block-out-s", "--encoder-depth"], "align.student_block", int,
     "student block s (1-indexed) fed to the head (SRA's or, with --align-target encoder, REPA's)"),
    (["--block-out-t"], "align.teacher_block", int, "teacher (EMA) block t > s giving the target"),
    (["--t-max"], "align.t_max", float, "largest teacher time gap, in (0, 1]"),
    (["--loss-type"], "align.loss_type", str,
     "alignment distance: cos | cos-release | cos-centered | sml1 | l2 | l1"),
    (["--align-weight", "--proj-coeff", "--lambda"], "align.weight", float,
     "alignment weight λ (0 runs no teacher)"),
    (["--align-schedule"], "align.schedule", str, "λ schedule: constant | exp-decay"),
    (["--align-decay-start"], "align.decay_start", int, "exp-decay: step after which λ decays"),
    (["--align-decay-steps"], "align.decay_steps", int, "exp-decay: steps per factor 0.1"),
    (["--align-until"], "align.until", int,
     "switch the alignment term (SRA or REPA) and the dispersive term off after this optimizer "
     "step (HASTE's early stop; the head then gets zero gradients, the teacher is no longer run)"),
    (["--dispersive-weight"], "dispersive.weight", float,
     "Dispersive Loss weight λ (0: off): λ·L on the raw output tokens of --dispersive-block in "
     "the student's own forward (no projector, no positives); adds to SRA/REPA, or alone with "
     "--vanilla. L is computed over each process's micro-batch (as the authors do), so it "
     "depends on the micro-batch size"),
    (["--dispersive-tau"], "dispersive.tau", float,
     "Dispersive Loss temperature τ of the InfoNCE kinds (paper 0.5; the PyTorch release 1)"),
    (["--dispersive-kind"], "dispersive.kind", str,
     "Dispersive Loss: infonce-l2 (the paper's) | infonce-cos | hinge | covariance"),
    (["--dispersive-block"], "dispersive.block", int,
     "Dispersive Loss: the block (1-indexed) whose output tokens are dispersed (default: depth // "
     "4, the paper's; the PyTorch release uses the last block)"),
    (["--disp-epsilon"], "dispersive.epsilon", float,
     "Dispersive Loss, --dispersive-kind hinge: the margin ε on ‖z_i − z_j‖²/d"),
    (["--use-alignment-loss"], "align.enabled", str2bool,
     "alignment on/off (off: no teacher; with token groups: DTS/AS alone)"),
    (["--mask-ratio"], "groups.mask_ratios", float_list,
     "token groups (SiT): one ratio r → groups of ⌊rT⌋ and T−⌊rT⌋ tokens; several ratios → "
     "normalised; 0 = one group (plain SRA)"),
    (["--dual-time-scheduling"], "groups.dual_time", str2bool,
     "token groups: each group draws its own time (off: groups share one)"),
    (["--attention-separation"], "groups.attention_separation", str2bool,
     "token groups: a token attends only to its own group"),
    (["--full-sample-prob"], "groups.full_sample_prob", float,
     "token groups: probability that a sample stays one group"),
    (["--teacher-t"], "groups.teacher_t", str,
     "token groups: teacher input: self_flow (whole image at the cleanest group's t) | same "
     "(the student's input) | sra (each group at its SRA teacher time)"),
    (["--teacher-mask"], "groups.teacher_mask", str2bool,
     "token groups: the teacher gets the groups' attention mask too"),
    (["--self-flow-clean-compat"], "groups.self_flow_clean_compat", str2bool,
     "reproduce the reference code's self_flow + teacher-mask quirk (groups ≥ 1 see the clean "
     "latent)"),
    (["--full-sample-group"], "groups.full_sample_group", int,
     "token groups: the group a full sample's tokens join: 0 (ours) | 1 (the reference code)"),
    (["--self-flow-tau-all-groups"], "groups.self_flow_tau_all_groups", str2bool,
     "token groups: self_flow's τ = min over every group's time, also for a full sample (the "
     "reference code; default: over the groups the sample has)"),
    (["--teacher-undropped-labels"], "groups.teacher_undropped_labels", str2bool,
     "token groups: the teacher sees the labels before label dropout (the reference code; "
     "default: the student's labels, as in SRA)"),
    (["--path-type"], "flow.path_type", str, "SiT interpolant: linear | cosine"),
    (["--prediction"], "flow.prediction", str, "SiT prediction target: v"),
    (["--weighting"], "flow.weighting", str, "SiT time sampler: uniform | lognormal"),
    (["--data-dir", "--data"], "data.data_dir", str,
     "'digits', a release dir/ZIP (vae-sd layout) or a packed dataset dir"),
    (["--resolution"], "data.resolution", int, "image resolution; must match the data"),
    (["--num-workers"], "data.num_workers", int, "DataLoader workers per process"),
    (["--cfg-prob"], "data.label_dropout", float, "label dropout probability (for CFG)"),
    (["--vae"], "data.vae", str, "VAE (hub id or path) to decode latent sample grids"),
    (["--image-dir"], "data.image_dir", str,
     "REPA on latents: the raw images (default: images/ beside vae-sd/, or the encode's source)"),
    (["--batch-size", "--global-batch-size"], "loop.global_batch_size", int,
     "GLOBAL batch per optimizer step (all processes × accumulation)"),
    (["--gradient-accumulation-steps"], "loop.gradient_accumulation_steps", int,
     "micro-batches per optimizer step"),
    (["--max-train-steps"], "loop.max_train_steps", int, "optimizer steps to train to"),
    (["--mixed-precision"], "loop.mixed_precision", str, "no | fp16 | bf16"),
    (["--allow-tf32"], "loop.allow_tf32", str2bool, "TF32 matmuls on Ampere+ GPUs"),
    (["--seed"], "loop.seed", int, "global seed (each process derives its own)"),
    (["--log-every"], "loop.log_every", int, "log every N steps"),
    (["--checkpoint-steps", "--checkpointing-steps"], "loop.checkpoint_steps", int,
     "write a checkpoint every N steps"),
    (["--keep-last"], "loop.keep_last", int, "checkpoints kept besides milestones"),
    (["--milestone-steps"], "loop.milestone_steps", int, "never prune checkpoints at multiples of N (0: off)"),
    (["--sample-steps", "--sampling-steps"], "loop.sample_steps", int,
     "EMA sample grid every N steps (0: only at the end)"),
    (["--grid-samples"], "loop.grid_samples", int, "images in each sample grid"),
    (["--max-consecutive-skips"], "loop.max_consecutive_skips", int,
     "stop after this many non-finite steps in a row"),
    (["--compile"], "loop.compile", str2bool, "torch.compile the student and teacher forwards"),
    (["--dist-timeout"], "loop.dist_timeout", int,
     "seconds a process may wait in a collective (the process group's watchdog; default 3600): "
     "the main process alone writes and verifies checkpoints and fetches artefacts meanwhile"),
    (["--report-to"], "loop.report_to", str, "tracker: tensorboard | wandb | none"),
    (["--eval-samples"], "loop.eval_samples", int, "digits: samples for the end-of-run metric"),
    (["--fid-every"], "fid.every", int,
     "score the EMA every N steps: FID + IS vs --fid-ref (digits: the classifier's FD); 0: off"),
    (["--fid-ref"], "fid.ref", str,
     "reference batch for --fid-every: a file, imagenet256, imagenet512, hf://… or a URL"),
    (["--fid-samples"], "fid.samples", int, "samples per in-training evaluation (e.g. 10000)"),
    (["--fid-batch-size"], "fid.batch_size", int,
     "samples per batch per process (fixes the seed set: results do not depend on processes)"),
    (["--fid-sampler"], "fid.sampler", sampler_preset,
     "sampler preset for in-training quality (e.g. fid-noguidance, paper-256, ode-fast)"),
    (["--inception-weights"], "fid.inception_weights", str,
     "Inception weights for --fid-every (default: inception-2015-12-05)"),
    (["--learning-rate", "--lr"], "optim.learning_rate", float, "AdamW learning rate"),
    (["--adam-beta1"], "optim.adam_beta1", float, "AdamW β1"),
    (["--adam-beta2"], "optim.adam_beta2", float, "AdamW β2"),
    (["--adam-weight-decay"], "optim.adam_weight_decay", float, "AdamW weight decay"),
    (["--adam-epsilon"], "optim.adam_epsilon", float, "AdamW ε"),
    (["--max-grad-norm"], "optim.max_grad_norm", float, "gradient-norm clip"),
    (["--warmup-steps"], "optim.warmup_steps", int, "linear learning-rate warm-up steps"),
    (["--ema-decay"], "ema.decay", float, "EMA decay per optimizer step"),
    (["--ema-warmup"], "ema.warmup", str2bool, "EMA decay min(decay, (1+n)/(10+n))"),
    (["--output-dir"], "output_dir", str, "parent directory of runs"),
    (["--exp-name"], "exp_name", str, "run name (the run directory is OUTPUT_DIR/EXP_NAME)"),
    (["--init-from"], "init_from", str, "initialise weights from a checkpoint (ours or the release's .pt)"),
]


def register(sub: argparse._SubParsersAction) -> None:
    from sra.training.config import PRESETS

    p = sub.add_parser(
        "train", help="train SiT/DiT with SRA, token groups, REPA or vanilla on accelerate",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="digits", choices=sorted(PRESETS),
                   help="named starting config; every other flag overrides one field of it "
                        "(default: digits)")
    p.add_argument("--vanilla", action="store_true",
                   help="no alignment and no teacher (the baseline for comparisons); "
                        "--dispersive-weight still adds Dispersive Loss")
    p.add_argument("--resume", default=None,
                   help="'auto' (newest complete checkpoint of this run) or a checkpoint path")
    p.add_argument("--epochs", type=int, default=None,
                   help="train this many epochs (converted to --max-train-steps from the data size)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for names, dest, typ, help_text in FLAGS:
        kwargs = dict(dest=dest.replace(".", "__"), default=None, help=help_text,
                      metavar=names[0].lstrip("-").upper().replace("-", "_"))
        if typ is str2bool:
            kwargs.update(type=str2bool, nargs="?", const=True, metavar="BOOL")
        else:
            kwargs.update(type=typ)
        p.add_argument(*names, **kwargs)
    p.set_defaults(func=run)


# With --align-target encoder the shared alignment flags set REPA's fields instead of SRA's.
ENCODER_ROUTES = {"align.student_block": "encoder_align.student_block",
                  "align.weight": "encoder_align.weight", "align.enabled": "encoder_align.enabled",
                  "align.until": "encoder_align.until"}
# --align-until switches every auxiliary term off, the dispersive one too.
ALSO_SETS = {"align.until": ("dispersive.until",)}
TEACHER_ONLY = ("align.teacher_block", "align.t_max", "align.loss_type", "align.schedule",
                "align.decay_start", "align.decay_steps")


def config_from_args(args: argparse.Namespace):
    """Preset + explicit flags → :class:`~sra.training.config.TrainConfig` (validated). A flag
    that would do nothing for the chosen alignment target is refused in one line."""
    from sra.training.config import override, preset

    cfg = preset(args.preset)
    target = "ema" if args.vanilla else (args.align_target or cfg.align_target)
    for names, dest, _, _ in FLAGS:
        value = getattr(args, dest.replace(".", "__"))
        if value is None:
            continue
        if target == "encoder" and dest in TEACHER_ONLY:
            raise SraError(f"{names[0]} sets SRA's EMA teacher, which --align-target encoder "
                           f"never runs; drop it")
        if target == "ema" and dest.startswith("encoder_align."):
            raise SraError(f"{names[0]} is for --align-target encoder (REPA); this run aligns "
                           f"to the EMA teacher" + (" (--vanilla: no alignment)" if args.vanilla else ""))
        cfg = override(cfg, ENCODER_ROUTES.get(dest, dest) if target == "encoder" else dest, value)
        for also in ALSO_SETS.get(dest, ()):
            cfg = override(cfg, also, value)
    if args.vanilla:
        cfg = override(override(cfg, "align_target", "ema"), "align.enabled", False)
    if cfg.uses_encoder:
        from sra.encoders import encoder_spec

        encoder_spec(cfg.encoder_align.encoder)  # an unknown name fails now, listing the names
    return cfg


def run(args: argparse.Namespace) -> int:
    from sra.training.loop import Trainer

    cfg = config_from_args(args)
    if args.print_config:
        print(cfg.to_json())
        return 0
    trainer = Trainer(cfg, resume=args.resume)
    if args.epochs is not None:
        from sra.training.config import override

        steps = args.epochs * len(trainer.dataset) // cfg.loop.global_batch_size
        trainer.cfg = override(trainer.cfg, "loop.max_train_steps", steps)
    run_dir = trainer.fit()
    if trainer.accelerator.is_main_process:  # one line per run, not one per process
        if trainer.was_complete:
            print(f"the run was already complete at step {trainer.step}; its outputs are finished")
        print(f"run directory: {run_dir}")
    return 0
