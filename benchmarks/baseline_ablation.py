"""Where does Wanda lose to magnitude on the default model? Swap the two baselines one layer kind at a time.

    python -m benchmarks.baseline_ablation [--prompts 32 --samples 200]

One calibration of the dense UNet (log-decrease weights, 25 steps), one-shot (no packages). For 50%
unstructured and 2:4, every layer gets magnitude's mask except one kind (resnet convs, self-attention,
cross-attention k/v, cross-attention q/out, feed-forward, proj_in/out, time embedding) that gets Wanda's;
plus all-magnitude, all-Wanda and all-obs-diff.
Each variant generates the same digits and is scored by the judge. Also measures how much of the
cross-attention k/v input energy ‖X‖² comes from the prompt's own tokens (the rest is padding and the
unconditional branch), which is what Wanda's ‖X_j‖ mostly sees. Writes
benchmarks/results/baseline_ablation.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.layer_errors import calibrate_dense_unet
from obsdiff.digits.data import prompt_for
from obsdiff.digits.evaluate import EvalSettings, evaluate_pipeline
from obsdiff.digits.train import DEFAULT_JUDGE_DIR
from obsdiff.layers import column_permutation, permute_hessian, set_weight_matrix, weight_matrix
from obsdiff.solver import magnitude_prune, obs_prune, wanda_prune
from obsdiff.sparsity import parse_sparsity


def layer_kind(name: str, module: torch.nn.Module) -> str:
    """The layer kinds of a UNet2DConditionModel, by what they read."""
    if name.endswith(("proj_in", "proj_out")):
        return "proj_in/out"
    if isinstance(module, torch.nn.Conv2d):
        return "resnet conv"
    if ".attn2.to_k" in name or ".attn2.to_v" in name:
        return "cross-attention k/v (read text states)"
    if ".attn2." in name:
        return "cross-attention q/out"
    if ".attn1." in name:
        return "self-attention"
    if ".ff." in name:
        return "feed-forward"
    return "time embedding"


@torch.no_grad()
def prompt_token_share(pipe) -> float:
    """Share of ‖X‖² of the cross-attention k/v inputs (text states, CFG batch) that the prompts' own tokens carry."""
    tok = pipe.tokenizer
    prompts = [prompt_for(d) for d in range(10)]
    encode = lambda texts: tok(texts, padding="max_length", max_length=tok.model_max_length,  # noqa: E731
                               return_tensors="pt").input_ids
    cond, uncond = encode(prompts), encode([""] * len(prompts))
    states = torch.cat([pipe.text_encoder(cond)[0], pipe.text_encoder(uncond)[0]])
    own = torch.cat([cond != tok.eos_token_id, torch.zeros_like(cond, dtype=torch.bool)])
    energy = states.pow(2).sum(-1)
    return float(energy[own].sum() / energy.sum())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    pipe, targets, hooks = calibrate_dense_unet(args.prompts)
    dense = {t.name: weight_matrix(t.module).clone() for t in targets}
    kinds = {t.name: layer_kind(t.name, t.module) for t in targets}
    settings = EvalSettings(samples=args.samples)
    result: dict = {"prompts": args.prompts, "samples": args.samples, "prompt_token_share": prompt_token_share(pipe),
                    "layers_per_kind": {}, "patterns": {}}
    print(f"prompt tokens carry {result['prompt_token_share']:.3f} of the cross-attention k/v input energy", flush=True)
    for kind in sorted(set(kinds.values())):
        names = [n for n, k in kinds.items() if k == kind]
        result["layers_per_kind"][kind] = {"layers": len(names), "weights": sum(dense[n].numel() for n in names)}
    for pattern in ("unstructured", "2:4"):
        pat = parse_sparsity(pattern)
        solved = {}
        for t in targets:
            h = permute_hessian(hooks.hessian(t.name).hessian, column_permutation(t.module))
            w = dense[t.name]
            solved[t.name] = {"magnitude": magnitude_prune(w, pat, h), "wanda": wanda_prune(w, h, pat),
                              "obs-diff": obs_prune(w, h, pat)}
        variants = {"all magnitude": lambda n: "magnitude", "all wanda": lambda n: "wanda",
                    "all obs-diff": lambda n: "obs-diff"}
        for kind in result["layers_per_kind"]:
            variants[f"wanda on {kind} only"] = lambda n, k=kind: "wanda" if kinds[n] == k else "magnitude"
        rows = {}
        for label, choose in variants.items():
            for t in targets:
                set_weight_matrix(t.module, solved[t.name][choose(t.name)].weight.to(dense[t.name].dtype))
            scores = evaluate_pipeline(pipe, DEFAULT_JUDGE_DIR, settings)
            rows[label] = {"accuracy": scores["conditional_accuracy"], "frechet_distance": scores["frechet_distance"]}
            print(f"{pattern:>12}  {label:<50} accuracy {rows[label]['accuracy']:.3f}  "
                  f"FD {rows[label]['frechet_distance']:.1f}", flush=True)
        result["patterns"][pattern] = rows
    for t in targets:
        set_weight_matrix(t.module, dense[t.name])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "baseline_ablation.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
