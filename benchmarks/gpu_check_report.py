"""gpu_check's results as markdown, ready to paste into the README: a heading naming the card,
then one small table per section (a skipped or failed case keeps its row, with the reason)."""

from __future__ import annotations

import datetime

from report import fmt_bytes, markdown_table


def _num(v, fmt: str = "{:.1f}", none: str = "–") -> str:
    return none if v is None else fmt.format(v)


def _cell(v) -> str:
    """Text for a table cell: an error message's | must not end the cell."""
    return str(v).replace("|", "\\|")


def _pct(v) -> str:
    return _num(None if v is None else 100 * v, "{:.1f} %")


def memory_kind(results: dict) -> str:
    """What the peak-memory figures are (CUDA allocator peak, or the process's peak RSS)."""
    return ("torch.cuda.max_memory_allocated, reset per case" if results["machine"].get("gpu")
            else "the process's peak RSS (VmHWM), a whole-process figure")


def _mem(rec: dict) -> str:
    return fmt_bytes(rec["peak_mem_bytes"]) if rec.get("peak_mem_bytes") else "–"


def heading(results: dict) -> list[str]:
    m = results["machine"]
    card = m.get("gpu") or f"CPU ({m.get('cpu')})"
    cuda = f", CUDA {m['cuda']}" if m.get("cuda") else ""
    today = datetime.date.today().isoformat()
    peak = results.get("peak_tflops")
    mfu = (f"MFU = analytic FLOPs (benchmarks/flops.py) over {peak:g} TFLOP/s bf16 dense"
           if peak else "no MFU (no known peak for this device)")
    return [f"### gpu_check: {card} — {m['mode']}, {today}", "",
            f"torch {m['torch']}{cuda}, accelerate {m.get('accelerate')}; "
            f"`{results['command']}`; {results['elapsed_s']:.0f} s of a "
            f"{results['budget_s']:.0f} s budget; {mfu}. Peak memory: {memory_kind(results)}.",
            ""]


def training(sec: dict, title: str) -> list[str]:
    rows = []
    for c in sec.get("cases", []):
        ok = c.get("status") == "ok"
        rows.append([c["arm"], c["batch"], "yes" if c["compile"] else "no",
                     _num(c.get("median_s") and 1000 * c["median_s"], "{:.1f} ms"),
                     _num(c.get("images_per_s")), _num(c.get("tflops_per_s")),
                     _pct(c.get("mfu")), _mem(c), _num(c.get("warmup_s"), "{:.1f} s"),
                     "ok" if ok else _cell(c.get("status"))])
    lines = [markdown_table([title, "micro-batch", "compile", "step (median)", "images/s",
                             "TFLOP/s", "MFU", "peak mem", "warm-up", "status"], rows), ""]
    for d in sec.get("dts_overhead", []):
        lines.append(f"- DTS+AS vs SRA at SiT-B/2, batch {d['batch']}: "
                     + (f"{d['overhead_pct']:+.1f} % step time" if d["status"] == "ok"
                        else d["status"]))
    return lines + ([""] if sec.get("dts_overhead") else [])


def fp16(rec: dict) -> list[str]:
    row = [rec.get("steps", "–"), rec.get("batch", "–"), rec.get("overflows", "–"),
           rec.get("divergent", "–"), _num(rec.get("final_scale"), "{:g}"),
           _num(rec.get("images_per_s_incl_warmup")), _cell(rec.get("status"))]
    lines = [markdown_table(["fp16 + GradScaler (SiT-XL/2), steps", "batch", "scaler overflows",
                             "divergent", "final scale", "images/s (all steps)", "status"],
                            [row])]
    return lines + ([f"- {rec['note']}"] if rec.get("note") else []) + [""]


def sdpa(sec: dict) -> list[str]:
    rows = []
    for name, p in sec.get("paths", {}).items():
        rows.append([name, ", ".join(p.get("forward", [])) or "–",
                     ", ".join(p.get("backward", [])) or "–",
                     _cell(p.get("flash_only", p.get("status"))),
                     _cell("<br>".join(p.get("kernels", [])[:3]) or "–")])
    return [markdown_table([f"SDPA path ({sec.get('model', '')})", "forward", "backward",
                            "flash only", "attention kernels (CUDA)"], rows), ""]


def sampling(sec: dict) -> list[str]:
    s = sec.get("sampler", {})
    rows = [[c["batch"], c["precision"], _num(c.get("plain_eval_s") and 1000 * c["plain_eval_s"],
                                              "{:.1f} ms"),
             _num(c.get("guided_eval_s") and 1000 * c["guided_eval_s"], "{:.1f} ms"),
             _num(c.get("estimated_run_s"), "{:.1f} s"), _num(c.get("images_per_s"), "{:.2f}"),
             _num(c.get("tflops_per_s")), _mem(c), _cell(c.get("status"))]
            for c in sec.get("cases", [])]
    lines = [markdown_table([f"sampling {sec.get('preset')} ({sec.get('model', '')}), batch",
                             "precision", "per eval, no CFG", "per eval, CFG",
                             f"{s.get('steps')}-step run (estimate)", "images/s (estimate)",
                             "TFLOP/s", "peak mem", "status"], rows)]
    lines.append(f"- Estimates: {sec.get('timed_steps_per_regime')} solver steps timed in each "
                 f"regime, extrapolated to the grid's {sec.get('plain_evaluations')} evaluations "
                 f"without and {sec.get('guided_evaluations')} with guidance (SDE "
                 f"{s.get('steps')} steps, CFG {s.get('cfg_scale')} for t ≤ "
                 f"{s.get('guidance_high')}). No SD-VAE decoding (no diffusers, no weights there).")
    d = sec.get("difference", {})
    if d.get("status") == "ok":
        tf, bf = (f"{d[k + '_max_abs_diff']:.2e} ({d[k + '_rel_diff']:.1e} of the std)"
                  for k in ("fp32+tf32", "bf16"))
        lines.append(f"- Whole {d['steps']}-step runs, batch {d['batch']}, same noise, random "
                     f"weights: max |Δ| vs strict fp32: fp32+TF32 {tf}, bf16 {bf}; bf16 vs TF32 "
                     f"{d['bf16_vs_tf32_max_abs_diff']:.2e}.")
    elif d:
        lines.append(f"- fp32/bf16 difference: {d.get('status')}")
    return lines + [""]


def inception(rec: dict) -> list[str]:
    row = [_num(rec.get("network_images_per_s")), _num(rec.get("eval_images_per_s")),
           rec.get("batch", "–"), rec.get("image_size", "–"), _cell(rec.get("status"))]
    return [markdown_table(["Inception (sra eval, fp32)", "network images/s",
                            "compute_activations images/s", "batch", "image px", "status"],
                           [[""] + row]), ""]


def resume(rec: dict) -> list[str]:
    row = [rec.get("model", "–"), _num(rec.get("resume_max_abs_diff_model"), "{:.3g}"),
           _num(rec.get("resume_max_abs_diff_ema"), "{:.3g}"),
           _num(rec.get("rerun_max_abs_diff_model"), "{:.3g}"),
           _num(rec.get("rerun_max_abs_diff_ema"), "{:.3g}"),
           _num(rec.get("moved_after_cut_max_abs"), "{:.3g}"), _cell(rec.get("status"))]
    # "\|": a bare | inside a cell would end it
    return [markdown_table(["resume: 4 steps vs 2 + resume to 4 (fresh process)",
                            "max \\|Δ\\| model", "max \\|Δ\\| EMA", "rerun max \\|Δ\\| model",
                            "rerun max \\|Δ\\| EMA", "moved after the cut (max)", "status"],
                           [row]), ""]


def to_markdown(results: dict) -> str:
    secs = results.get("sections", {})
    lines = heading(results)
    for name, title in (("train", "training, eager (bf16)"),
                        ("train_compile", "training, torch.compile (bf16)")):
        if name in secs:
            lines += training(secs[name], title) if "cases" in secs[name] else \
                [f"- {title}: {secs[name].get('status')}", ""]
    parts = {"fp16": fp16, "sdpa": sdpa, "sampling": sampling, "inception": inception,
             "resume": resume}
    for name, fn in parts.items():
        if name in secs:
            lines += fn(secs[name])
    return "\n".join(lines).rstrip() + "\n"
