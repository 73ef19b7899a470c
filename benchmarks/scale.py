"""Real-size pipelines, random weights: memory and time of each stage at SD 1.5 / SDXL scale.

    python -m benchmarks.scale build sd15 /tmp/sd15          # the architecture from its published configs
    python -m benchmarks.scale run /tmp/sd15 [--stages info,plan,prune-block,plan-package,prune-package,export-cpu,...]

The weights are random, so quality means nothing here; memory and time are real. Nothing is downloaded: the
configs below are SD 1.5's and SDXL's published ones, and the tokenizer is the project's own (a CLIP BPE over
its small vocabulary, padded to 77 tokens as CLIP's). Each stage runs ``obsdiff`` in its own process; its wall
time and peak RSS (``wait4``'s ru_maxrss) go to ``benchmarks/results/scale.md`` with the command that ran it.
Run one big job at a time: an SD 1.5 fp32 UNet is 3.4 GB, and one 1280×2560×3×3 conv has a 23040² Hessian.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32,
    sample_size=512,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


def _clip(cls, tokenizer, **config):
    from transformers import CLIPTextConfig

    from obsdiff.digits.data import BOS, EOS

    vocab = tokenizer.get_vocab()
    return cls(CLIPTextConfig(vocab_size=49408, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                              pad_token_id=vocab[EOS], **config))


def build(family: str, folder: Path) -> Path:
    """Save a ``family`` pipeline with random weights (safetensors) to ``folder``."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from obsdiff.digits.train import SCHEDULER_CONFIG, build_tokenizer

    torch.manual_seed(0)
    folder = Path(folder)
    tokenizer = build_tokenizer(folder.with_name(folder.name + "_tokenizer"))
    vae = diffusers.AutoencoderKL(**VAE, scaling_factor=0.18215 if family == "sd15" else 0.13025)
    scheduler = diffusers.DDIMScheduler(**SCHEDULER_CONFIG)
    if family == "sd15":
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=_clip(CLIPTextModel, tokenizer, **CLIP_L), tokenizer=tokenizer,
            unet=diffusers.UNet2DConditionModel(**SD15_UNET), scheduler=scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    elif family == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=_clip(CLIPTextModel, tokenizer, **CLIP_L), tokenizer=tokenizer,
            text_encoder_2=_clip(CLIPTextModelWithProjection, tokenizer, **CLIP_BIGG), tokenizer_2=tokenizer,
            unet=diffusers.UNet2DConditionModel(**SDXL_UNET), scheduler=scheduler)
    else:
        raise SystemExit(f"scale: unknown family {family!r} (sd15, sdxl)")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def measure(cmd: list[str], log: Path) -> dict:
    """Run one stage; wall time and the child's own peak RSS.

    A Ctrl-C or SIGTERM sent to this runner is passed on to the stage, which then stops the way it does on its own
    (a prune keeps its resume folder); the runner waits for it and stops too. Without this, a signal to the runner
    left the stage running on, orphaned."""
    t0 = time.time()
    plan_json = "--plan" in cmd and "--json" in cmd  # stdout is the plan: kept apart from the log
    with open(log, "w") as out, open(log.with_suffix(".json"), "w") if plan_json else contextlib.nullcontext() as js:
        proc = subprocess.Popen(cmd, stdout=js or out, stderr=out, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        terminated: list[int] = []

        def forward(signum: int, _frame) -> None:
            terminated.append(signum)
            proc.send_signal(signum)

        previous = signal.signal(signal.SIGTERM, forward)
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # retried after forward() returns (PEP 475)
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            proc.wait()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        if terminated:
            raise SystemExit(128 + terminated[0])
    row = {"command": shlex.join(cmd), "exit": os.waitstatus_to_exitcode(status), "wall_s": time.time() - t0,
           "peak_rss_gb": usage.ru_maxrss / 1024**2, "log": str(log)}  # GiB (ru_maxrss is in KiB)
    plan = _plan_of(cmd, log.with_suffix(".json") if plan_json else None) if row["exit"] == 0 else None
    if plan:
        row["expected_peak_gib"] = plan.get("expected_peak_gib")
        row["calibration_parts"] = plan.get("calibration_parts")
    return row


def _plan_of(cmd: list[str], plan_file: Path | None) -> dict | None:
    """The memory plan a stage printed (``--plan --json``) or recorded (a prune's ``pruning.json``), if any."""
    try:
        if plan_file is not None:
            return json.loads(plan_file.read_text())
        if "prune" in cmd and "--out" in cmd:
            record = Path(cmd[cmd.index("--out") + 1]) / "pruning.json"
            return json.loads(record.read_text()).get("memory_plan") if record.is_file() else None
    except (OSError, ValueError):
        return None
    return None


# The biggest package of SD 1.5's `--plan --max-memory 12` (package 4 of 6: 21 layers, 5.64 GiB of Hessians).
SD15_BIGGEST_PACKAGE = "up_blocks.0.resnets.2,up_blocks.0.upsamplers.0,up_blocks.1.resnets.0,up_blocks.1.attentions.0"


# The biggest package of SDXL's `--plan --max-memory 20` at 1024 px (package 4 of 4: 191 layers, 6.89 GiB of Hessians).
SDXL_BIGGEST_PACKAGE = "up_blocks.0.resnets.2,up_blocks.0.attentions.2,up_blocks.0.upsamplers.0,up_blocks.1.*,up_blocks.2.*"


def stages(model: Path, work: Path, blocks: str, height: int, package: str) -> dict[str, list[str]]:
    obsdiff = [sys.executable, "-m", "obsdiff"]
    native = _native_size(model)
    sdxl = native >= 1024
    lean_budget = "20" if sdxl else "12"
    lean_package = SDXL_BIGGEST_PACKAGE if sdxl and package == SD15_BIGGEST_PACKAGE else package
    calibration = ["--num-prompts", "2", "--steps", "2", "--batch-size", "2", "--height", "256", "--width", "256"]
    small = [*calibration, "--refine", "0"]  # the published rows were measured before --refine existed
    size = ["--height", str(height), "--width", str(height), "--gate-prompts", "1", "--gate-steps", "2"]
    pruned = work / "pruned"
    one_package = ["--pattern", "2:4", "--max-memory", "12", "--packages", "1", *small, "--blocks", package]
    recover = ["--height", "256", "--width", "256", "--max-memory", "20", "--num-prompts", "2", "--trajectory-steps",
               "2", "--batch-size", "2", "--steps", "4", "--warmup", "0", "--lr", "1e-5"]
    return {
        "info": [*obsdiff, "info", str(model)],
        "plan": [*obsdiff, "prune", str(model), "--out", str(work / "plan"), "--pattern", "2:4", "--plan",
                 "--max-memory", "12"],
        "prune-block": [*obsdiff, "prune", str(model), "--out", str(pruned), "--overwrite", "--pattern", "2:4", *small,
                        "--blocks", blocks],
        "plan-package": [*obsdiff, "prune", str(model), "--out", str(work / "package"), "--plan", *one_package],
        "prune-package": [*obsdiff, "prune", str(model), "--out", str(work / "package"), "--overwrite", *one_package],
        "export-cpu": [*obsdiff, "export", str(pruned), "--target", "cpu", "--out", str(work / "cpu"), "--overwrite", *size],
        "validate-cpu": [*obsdiff, "validate", str(work / "cpu")],
        "export-jetson": [*obsdiff, "export", str(pruned), "--target", "jetson", "--out", str(work / "jetson"),
                          "--overwrite", *size],
        "validate-jetson": [*obsdiff, "validate", str(work / "jetson")],
        # the whole UNet at the calibration defaults (what `ship --target jetson` prunes with), at the model's size
        "plan-defaults": [*obsdiff, "prune", str(model), "--out", str(work / "full"), "--pattern", "2:4", "--plan",
                          "--json", "--refine", "0"],
        "prune-defaults": [*obsdiff, "prune", str(model), "--out", str(work / "full"), "--pattern", "2:4", "--refine",
                           "0"],
        # after an interruption (a 3-hour run may not fit one sitting): the sum of both stages' walls is the prune's
        "prune-defaults-resume": [*obsdiff, "prune", str(model), "--out", str(work / "full"), "--pattern", "2:4",
                                  "--resume", "--refine", "0"],
        "export-jetson-full": [*obsdiff, "export", str(work / "full"), "--target", "jetson", "--out",
                               str(work / "jetson-full"), "--overwrite", *size],
        "validate-jetson-full": [*obsdiff, "validate", str(work / "jetson-full")],
        "export-ios": [*obsdiff, "export", str(pruned), "--target", "ios", "--out", str(work / "ios"), "--overwrite",
                       "--height", str(height), "--width", str(height)],
        # the lean pipeline (issue 30): the plan at the model's native size (SD 1.5 512 px within 12 GiB, SDXL 1024 px
        # within 20), then one whole package of it at that size with a small calibration
        "plan-lean": [*obsdiff, "prune", str(model), "--out", str(work / "lean"), "--pattern", "2:4", "--plan",
                      "--json", "--max-memory", lean_budget, "--height", str(native), "--width", str(native)],
        "prune-lean-package": [*obsdiff, "prune", str(model), "--out", str(work / "lean"), "--overwrite", "--pattern",
                               "2:4", "--max-memory", lean_budget, "--height", str(native), "--width", str(native),
                               "--num-prompts", "1", "--steps", "2", "--batch-size", "1", "--refine", "0",
                               "--packages", "1", "--blocks", lean_package],
        "plan-lean-package": [*obsdiff, "prune", str(model), "--out", str(work / "lean"), "--pattern", "2:4",
                              "--max-memory", lean_budget, "--height", str(native), "--width", str(native),
                              "--num-prompts", "1", "--steps", "2", "--batch-size", "1", "--refine", "0",
                              "--packages", "1", "--blocks", lean_package, "--plan", "--json"],
        # issue 27: one stacked prune (structured shrink, then GPTQ int8 of the shrunk layers) of the same blocks as
        # prune-block, small calibration; exported to cpu-int8 (int8 codes, static int8 activations) at full size
        "prune-stacked-block": [*obsdiff, "prune", str(model), "--out", str(work / "stacked"), "--overwrite",
                                "--pattern", "structured", "--head-sparsity", "0.3", "--ffn-sparsity", "0.3",
                                "--channel-sparsity", "0.3", "--quantize", "int8", *calibration, "--blocks", blocks],
        "export-cpu-int8": [*obsdiff, "export", str(work / "stacked"), "--target", "cpu-int8", "--out",
                            str(work / "cpu-int8"), "--overwrite", *size],
        "validate-cpu-int8": [*obsdiff, "validate", str(work / "cpu-int8")],
        # recover distils the full 2:4 prune at 256 px within 20 GiB (a few steps: memory and seconds per step)
        "plan-recover": [*obsdiff, "recover", str(work / "full"), "--plan", "--json", *recover],
        "recover": [*obsdiff, "recover", str(work / "full"), "--out", str(work / "recovered"), "--overwrite",
                    *recover],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("family", choices=["sd15", "sdxl"])
    b.add_argument("folder", type=Path)
    r = sub.add_parser("run")
    r.add_argument("model", type=Path)
    r.add_argument("--work", type=Path, default=Path("/tmp/obsdiff-scale"))
    r.add_argument("--stages", default="info,plan,prune-block,plan-package,prune-package,export-cpu,validate-cpu,"
                                       "export-jetson,validate-jetson,export-ios")
    r.add_argument("--blocks", default="up_blocks.0.resnets.0,up_blocks.1.attentions.0")
    r.add_argument("--package", default=SD15_BIGGEST_PACKAGE, help="blocks of one package (plan-package, prune-package)")
    r.add_argument("--height", type=int, default=512)
    r.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    m = sub.add_parser("markdown", help="rewrite scale.md from scale.json")
    m.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args(argv)
    if args.command == "build":
        print(build(args.family, args.folder))
        return 0
    if args.command == "markdown":
        write_markdown(json.loads(args.out.read_text()), args.out.with_suffix(".md"))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    key = args.model.name
    table = stages(args.model, args.work, args.blocks, args.height, args.package)
    for name in args.stages.split(","):
        row = measure(table[name], args.work / f"{name}.log")
        # read again just before writing: another runner's rows, written meanwhile, are kept
        results = json.loads(args.out.read_text()) if args.out.is_file() else {}
        results.setdefault(key, {})[name] = {**row, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                             "date": time.strftime("%Y-%m-%d"), "commit": _commit(),
                                             "largest_component_gib": _largest_component_gib(args.model)}
        print(f"[scale] {key} {name}: exit {row['exit']}, {row['wall_s']:.0f} s, peak RSS {row['peak_rss_gb']:.2f} GiB",
              flush=True)
        staged = args.out.with_suffix(".json.tmp")
        staged.write_text(json.dumps(results, indent=2))
        staged.replace(args.out)
        write_markdown(results, args.out.with_suffix(".md"))
        if row["exit"] != 0:
            break
    return 0


def _native_size(model: Path) -> int:
    """The pixel size the model was built for (its UNet's sample size × the VAE's scale); 512 when unknown."""
    try:
        unet = json.loads((model / "unet" / "config.json").read_text())
        vae = json.loads((model / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError):
        return 512


def _commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent)
    return proc.stdout.strip() or "-"


def _largest_component_gib(model: Path) -> float:
    """The fp32 size of the model's largest component (its safetensors), what export memory is measured against."""
    sizes = [sum(f.stat().st_size for f in folder.glob("*.safetensors")) for folder in model.iterdir() if folder.is_dir()]
    return max(sizes, default=0) / 1024**3


def write_markdown(results: dict, path: Path) -> None:
    lines = ["# Real-size stages (random weights)", "", "Written by `python -m benchmarks.scale run MODEL` "
             "(build MODEL with `python -m benchmarks.scale build sd15|sdxl MODEL`). Peak RSS is the stage's own "
             "process (`wait4`, GiB); ×largest is that peak over the fp32 size of the model's largest component "
             "(export's budget is 3×). Plan GiB: the process peak the stage's memory plan expected (`--plan --json`, "
             "or a prune's `pruning.json`). One stage at a time on the machine named in scale.json.", "",
             "| model | stage | exit | wall s | peak RSS GiB | plan GiB | ×largest | commit | command |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = list(stages(Path("M"), Path("W"), "", 0, ""))
    for model, rows in results.items():
        for name in sorted(rows, key=lambda n: order.index(n) if n in order else len(order)):
            row = rows[name]
            largest = row.get("largest_component_gib")
            ratio = f"{row['peak_rss_gb'] / largest:.2f}" if largest else "-"
            command = row["command"].replace(row["command"].split(" -m ")[0], "python", 1)
            plan = f"{row['expected_peak_gib']:.2f}" if row.get("expected_peak_gib") is not None else "-"
            lines.append(f"| {model} | {name} | {row['exit']} | {row['wall_s']:.0f} | {row['peak_rss_gb']:.2f} | {plan} | "
                         f"{ratio} | {row.get('commit', '-')} | `{command}` |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
