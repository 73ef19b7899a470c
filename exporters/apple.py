"""Apple's layout: the component descriptions that apple/ml-stable-diffusion's Swift ``StableDiffusion`` package loads.

The contract, read from its sources (``swift/StableDiffusion/pipeline/``):
- ``StableDiffusionPipeline+Resources.swift``: ``Resources/`` holds ``TextEncoder.mlmodelc``, ``Unet.mlmodelc`` or
  ``UnetChunk1.mlmodelc`` + ``UnetChunk2.mlmodelc``, ``VAEDecoder.mlmodelc`` (``VAEEncoder.mlmodelc`` optional),
  ``vocab.json`` and ``merges.txt``; ``StableDiffusionXL+Resources.swift`` adds ``TextEncoder2.mlmodelc``.
- ``TextEncoder.swift``: one input (read by name from the model), token ids as float32 ``(1, 77)``; reads
  ``last_hidden_state``. ``TextEncoderXL.swift``: reads ``hidden_embeds`` (the penultimate hidden state) and
  ``pooled_outputs``.
- ``Unet.swift``: inputs ``sample``, ``timestep`` (float32 ``[B]``), ``encoder_hidden_states`` in the ``(B, C, 1, S)``
  layout (``StableDiffusionPipeline.toHiddenStates``), SDXL also ``text_embeds`` and ``time_ids``; the latent shape is
  the ``sample`` input's constraint; the noise is the first output. Chunks run in sequence, each fed the previous
  chunk's outputs merged with the original inputs (``ManagedMLModel.swift``, ``predictions(from:)``).
- ``Decoder.swift``: one input (``z`` in Apple's converter), scaled by 1/scale_factor in Swift; the first output is
  the image in [-1, 1].
Apple's converter (``python_coreml_stable_diffusion/torch2coreml.py``) writes the same names. SD3 and Flux are not
in this layout here (a documented error): Apple's SD3 pipeline has its own MMDiT contract that we do not write yet,
and it has no Flux pipeline.

``--attention-implementation split-einsum`` swaps the attention math for Apple's ANE-friendly formulation
(``SPLIT_EINSUM``: per-head einsums on a channels-first ``(B, C, 1, S)`` tensor), written here as a diffusers
attention processor; ``original`` keeps diffusers' own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from obsdiff.errors import UsageError
from obsdiff.exporters.components import (
    DENOISER,
    TEXT_ENCODER,
    VAE_DECODER,
    ComponentSpec,
    TensorSpec,
    VAEDecoderWrapper,
)
from obsdiff.exporters.profiles import (  # noqa: F401  (parse_layout, parse_attention: re-exported)
    AttentionImplementation,
    CoreMLOptions,
    Layout,
    parse_attention,
    parse_layout,
)

_F32 = torch.float32
CHUNK_ABOVE_BYTES = 1 << 30  # ios chunks the UNet by default above 1 GB of weights, as Apple does for iPhones


# ---- wrappers --------------------------------------------------------------------------------------------


class AppleTextEncoder(nn.Module):
    """Float token ids in; SD 1.x/2.x: ``last_hidden_state``, ``pooled_outputs``; SDXL: ``hidden_embeds`` (the
    penultimate layer) and ``pooled_outputs`` (the projection of a CLIP with one, else the pooled output)."""

    def __init__(self, text_encoder: nn.Module, penultimate: bool) -> None:
        super().__init__()
        self.model, self.penultimate = text_encoder, penultimate

    def forward(self, input_ids: torch.Tensor):
        ids = input_ids.to(torch.long)
        if not self.penultimate:
            out = self.model(ids, return_dict=False)
            return out[0], out[1]
        out = self.model(ids, output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.hidden_states[-2], pooled


def _states(encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """Apple's (B, C, 1, S) text states back to diffusers' (B, S, C)."""
    return encoder_hidden_states.squeeze(2).transpose(1, 2)


class AppleUNet(nn.Module):
    """``sample``, float ``timestep`` [B], ``encoder_hidden_states`` (B, C, 1, S) [, ``text_embeds``, ``time_ids``]."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.model = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.model(sample, timestep, _states(encoder_hidden_states), added_cond_kwargs=added, return_dict=False)[0]


# ---- the UNet in two chunks ---------------------------------------------------------------------------


def _stages(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The UNet's blocks in forward order: where a chunk boundary may fall."""
    return ([(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)] + [("mid_block", unet.mid_block)]
            + [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)])


def chunk_split(unet: nn.Module) -> int:
    """Number of stages in chunk 1, so that the two chunks' weights are as equal as block boundaries allow
    (embeddings and conv_in go with chunk 1, the output convolution with chunk 2: both small)."""
    sizes = [sum(p.numel() for p in block.parameters()) for _, block in _stages(unet)]
    return min(range(1, len(sizes)), key=lambda k: abs(2 * sum(sizes[:k]) - sum(sizes)))


class _UNetRunner:
    """diffusers' ``UNet2DConditionModel.forward`` split at a stage, for the plain text-to-image path (no ControlNet,
    adapters, class labels or attention masks), so that both chunks run exactly what the whole model runs."""

    def __init__(self, unet: nn.Module, split: int) -> None:
        self.unet, self.split = unet, split
        self.stages = _stages(unet)

    def embed(self, sample, timestep, encoder_hidden_states, added):
        unet = self.unet
        t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
        emb = unet.time_embedding(t_emb, None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added or {})
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        return emb

    def run(self, stages: range, sample, emb, states, residuals: list) -> tuple[torch.Tensor, list]:
        for index in stages:
            name, block = self.stages[index]
            cross = getattr(block, "has_cross_attention", False)
            kwargs = {"encoder_hidden_states": states} if cross else {}
            if name.startswith("down_blocks"):
                sample, res = block(hidden_states=sample, temb=emb, **kwargs)
                residuals = residuals + list(res)
            elif name == "mid_block":
                sample = block(sample, emb, **kwargs)
            else:
                n = len(block.resnets)
                res, residuals = tuple(residuals[-n:]), residuals[:-n]
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, **kwargs)
        return sample, residuals

    def finish(self, sample):
        unet = self.unet
        if unet.conv_norm_out is not None:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        return unet.conv_out(sample)


class AppleUNetChunk1(nn.Module):
    """Embeddings, conv_in and the first ``split`` stages; outputs the hidden state, the time embedding and the skip
    tensors chunk 2 still needs."""

    def __init__(self, unet: nn.Module, split: int) -> None:
        super().__init__()
        self.model, self.split = unet, split

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        runner = _UNetRunner(self.model, self.split)
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        states = _states(encoder_hidden_states)
        emb = runner.embed(sample, timestep, states, added)
        first = self.model.conv_in(sample)  # also the first skip tensor, as in diffusers' forward
        hidden, residuals = runner.run(range(self.split), first, emb, states, [first])
        return (hidden, emb, *residuals)


class AppleUNetChunk2(nn.Module):
    """The remaining stages and the output convolution, from chunk 1's outputs and ``encoder_hidden_states``."""

    def __init__(self, unet: nn.Module, split: int) -> None:
        super().__init__()
        self.model, self.split = unet, split

    def forward(self, chunk_hidden, chunk_emb, encoder_hidden_states, *residuals):
        runner = _UNetRunner(self.model, self.split)
        hidden, left = runner.run(range(self.split, len(runner.stages)), chunk_hidden, chunk_emb,
                                  _states(encoder_hidden_states), list(residuals))
        if left:
            raise RuntimeError(f"{len(left)} skip tensors were not consumed by chunk 2")
        return runner.finish(hidden)


def chunk_interface(unet: nn.Module, split: int, inputs: dict[str, torch.Tensor]) -> tuple[list[str], list[tuple]]:
    """Names and shapes of chunk 1's outputs (= chunk 2's inputs besides ``encoder_hidden_states``), found by running
    chunk 1 once on ``inputs``."""
    with torch.no_grad():
        outs = AppleUNetChunk1(unet, split)(*inputs.values())
    names = ["chunk_hidden", "chunk_emb"] + [f"chunk_skip_{i}" for i in range(len(outs) - 2)]
    return names, [tuple(o.shape) for o in outs]


# ---- split-einsum attention (Apple's ANE formulation) ------------------------------------------------------


def split_einsum(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """Attention per head on channels-first tensors (B, C, 1, S), as Apple's ``SPLIT_EINSUM``: no (B, H, S, d)
    reshapes, one einsum pair per head, softmax over the key axis."""
    d = q.shape[1] // heads
    k = k.transpose(1, 3)  # (B, S_k, 1, C)
    out = []
    for h in range(heads):
        qh, kh, vh = q[:, h * d : (h + 1) * d], k[:, :, :, h * d : (h + 1) * d], v[:, h * d : (h + 1) * d]
        weights = torch.einsum("bchq,bkhc->bkhq", qh, kh) * scale  # (B, S_k, 1, S_q)
        weights = weights.softmax(dim=1)
        out.append(torch.einsum("bkhq,bchk->bchq", weights, vh))  # (B, d, 1, S_q)
    return torch.cat(out, dim=1)


class SplitEinsumAttnProcessor:
    """diffusers' attention with the core replaced by ``split_einsum`` (projections, norms and residuals unchanged)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if attention_mask is not None:
            raise UsageError("split-einsum attention takes no attention mask (text-to-image UNets use none)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        channels_first = [t.transpose(1, 2).unsqueeze(2) for t in (query, key, value)]  # (B, C, 1, S)
        out = split_einsum(*channels_first, heads=attn.heads, scale=attn.scale)
        hidden_states = attn.to_out[1](attn.to_out[0](out.squeeze(2).transpose(1, 2)))
        if four_d:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def attention_implementation(module: nn.Module, impl: AttentionImplementation) -> Iterator[None]:
    """Run ``module`` with ``impl`` inside the block; its own processors are put back afterwards."""
    if impl is AttentionImplementation.ORIGINAL or not hasattr(module, "set_attn_processor"):
        yield
        return
    saved = module.attn_processors
    module.set_attn_processor(SplitEinsumAttnProcessor())
    try:
        yield
    finally:
        module.set_attn_processor(saved)


# ---- descriptions ---------------------------------------------------------------------------------------

SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def check_family(pipe) -> None:
    name = type(pipe).__name__
    if name not in SUPPORTED:
        raise UsageError(f"--layout apple: Apple's Swift StableDiffusion pipeline cannot run {name} here (it runs "
                         f"SD 1.x/2.x and SDXL in this layout; SD3 has its own MMDiT contract we do not write yet, and "
                         "there is no Flux pipeline); export with --layout ours")


def apple_specs(pipe, dims: dict[str, int], chunk: bool) -> tuple[ComponentSpec, ...]:
    """The Swift contract as component descriptions: names, dtypes and the (B, C, 1, S) text states.

    ``chunk``: the UNet as ``UnetChunk1`` + ``UnetChunk2`` (whose interface is found by running chunk 1 once).
    """
    check_family(pipe)
    xl = type(pipe).__name__ == "StableDiffusionXLPipeline"
    latent = ("unet_batch", "latent_channels", "latent_height", "latent_width")
    text_dim = "cross_attention" if xl else "text_encoder.hidden"
    states = TensorSpec("encoder_hidden_states", _F32, ("unet_batch", text_dim, 1, "text_encoder.sequence"))
    unet_inputs = [TensorSpec("sample", _F32, latent), TensorSpec("timestep", _F32, ("unet_batch",)), states]
    if xl:
        unet_inputs += [TensorSpec("text_embeds", _F32, ("unet_batch", "text_encoder_2.projection")),
                        TensorSpec("time_ids", _F32, ("unet_batch", 6))]
    specs = []
    for name, package in (("text_encoder", "TextEncoder"), ("text_encoder_2", "TextEncoder2")):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        seq, hid = f"{name}.sequence", f"{name}.hidden"
        pooled = f"{name}.projection" if "WithProjection" in type(module).__name__ else hid
        first = "hidden_embeds" if xl else "last_hidden_state"
        specs.append(ComponentSpec(
            package, name, TEXT_ENCODER,
            inputs=(TensorSpec("input_ids", _F32, (1, seq), high=f"{name}.vocab"),),
            outputs=(TensorSpec(first, _F32, (1, seq, hid)), TensorSpec("pooled_outputs", _F32, (1, pooled))),
            wrapper=lambda m, xl=xl: AppleTextEncoder(m, penultimate=xl), dynamic=()))
    unet_spec = ComponentSpec("Unet", "unet", DENOISER, inputs=tuple(unet_inputs),
                              outputs=(TensorSpec("noise_pred", _F32, latent),), wrapper=AppleUNet, dynamic=())
    if chunk:
        specs += unet_chunks(pipe.unet, unet_spec, dims)
    else:
        specs.append(unet_spec)
    specs.append(ComponentSpec(
        "VAEDecoder", "vae", VAE_DECODER,
        inputs=(TensorSpec("z", _F32, (1, "vae_latent_channels", "latent_height", "latent_width")),),
        outputs=(TensorSpec("image", _F32, (1, "image_channels", "height", "width")),),
        wrapper=VAEDecoderWrapper,  # z (divided by the scaling factor in Swift) → image in [-1, 1], as ours
        dynamic=()))
    return tuple(specs)


def unet_chunks(unet: nn.Module, whole: ComponentSpec, dims: dict[str, int]) -> list[ComponentSpec]:
    """``UnetChunk1`` (the original inputs → hidden state, time embedding, skips) and ``UnetChunk2`` (those and
    ``encoder_hidden_states`` → ``noise_pred``), split where the weights are closest to half."""
    split = chunk_split(unet)
    names, shapes = chunk_interface(unet, split, whole.sample_inputs(dims))
    middle = tuple(TensorSpec(n, _F32, s) for n, s in zip(names, shapes))
    states = next(t for t in whole.inputs if t.name == "encoder_hidden_states")
    first = ComponentSpec("UnetChunk1", "unet", DENOISER, inputs=whole.inputs, outputs=middle,
                          wrapper=lambda m: AppleUNetChunk1(m, split), dynamic=())
    second = ComponentSpec("UnetChunk2", "unet", DENOISER, inputs=(middle[0], middle[1], states, *middle[2:]),
                           outputs=whole.outputs, wrapper=lambda m: AppleUNetChunk2(m, split), dynamic=())
    return [first, second]


# ---- options, checks and device files ------------------------------------------------------------------


@dataclass(frozen=True)
class AppleOptions:
    """``--layout``, ``--chunk-unet`` and ``--attention-implementation``, parsed once; ``None`` where the profile
    decides (its ``[coreml]`` table: ``layout``, ``chunk_unet`` true/false/"auto", ``attention_implementation``)."""

    layout: Layout | None = None
    chunk_unet: bool | None = None
    attention: AttentionImplementation | None = None

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.layout, self.chunk_unet, self.attention))

    def resolve(self, profile: CoreMLOptions) -> tuple[Layout, bool | None, AttentionImplementation]:
        """Layout, chunking (None: "auto", decided from the UNet's size) and attention, options over the profile."""
        layout = self.layout or profile.layout
        attention = self.attention or profile.attention_implementation
        chunk = self.chunk_unet if self.chunk_unet is not None else profile.chunk_unet
        if layout is Layout.OURS and self.chunk_unet:
            raise UsageError("--chunk-unet splits the UNet the way Apple's Swift pipeline loads it: use it with "
                             "--layout apple")
        if layout is Layout.OURS:
            chunk = False
        return layout, chunk, attention


def auto_chunk(unet: nn.Module, bytes_per_weight: int) -> bool:
    """Apple chunks the UNet for iOS when its weights pass about 1 GB."""
    return sum(p.numel() for p in unet.parameters()) * bytes_per_weight > CHUNK_ABOVE_BYTES


def chunk_of(weight: str, unet: nn.Module, split: int) -> str:
    """Which chunk package holds a UNet weight (by its module path)."""
    for index, (prefix, _) in enumerate(_stages(unet)):
        if weight.startswith(prefix + "."):
            return "UnetChunk1" if index < split else "UnetChunk2"
    return "UnetChunk2" if weight.startswith(("conv_norm_out.", "conv_out.")) else "UnetChunk1"


@torch.no_grad()
def layout_check(pipe, spec: ComponentSpec, dims: dict[str, int], attention: AttentionImplementation) -> dict[str, float]:
    """Cosine of each Apple-layout output against the unwrapped diffusers module on the same inputs.

    Catches layout bugs (a transposed text state, a wrong hidden layer) on Linux, before conversion. ``UnetChunk1``
    is checked as the chain chunk 1 → chunk 2 against the whole UNet; ``UnetChunk2`` by that same chain.
    """
    module = getattr(pipe, spec.source)
    inputs = spec.sample_inputs(dims)
    if spec.role == TEXT_ENCODER:
        got = spec.wrapper(module)(*inputs.values())
        ids = inputs["input_ids"].long()
        if spec.outputs[0].name == "hidden_embeds":
            out = module(ids, output_hidden_states=True)
            ref = (out.hidden_states[-2], out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output)
        else:
            ref = module(ids, return_dict=False)[:2]
    elif spec.role == VAE_DECODER:
        got, ref = (spec.wrapper(module)(inputs["z"]),), (module.decode(inputs["z"]).sample,)
    elif spec.name == "UnetChunk2":
        return {}  # checked with chunk 1, whose inputs are the original ones
    else:
        xl = "text_embeds" in inputs
        added = {"added_cond_kwargs": {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}} if xl else {}
        ref = (module(inputs["sample"], inputs["timestep"], _states(inputs["encoder_hidden_states"]), **added).sample,)
        with attention_implementation(module, attention):
            if spec.name == "UnetChunk1":
                split = chunk_split(module)
                middle = AppleUNetChunk1(module, split)(*inputs.values())
                got = (AppleUNetChunk2(module, split)(middle[0], middle[1], inputs["encoder_hidden_states"],
                                                      *middle[2:]),)
            else:
                got = (spec.wrapper(module)(*inputs.values()),)
    names = ["noise_pred (chunk 1 → chunk 2)"] if spec.name == "UnetChunk1" else [t.name for t in spec.outputs]
    return {n: float(torch.nn.functional.cosine_similarity(g.flatten().double(), r.flatten().double(), dim=0))
            for n, g, r in zip(names, got, ref)}


def contract_files(specs: tuple[ComponentSpec, ...]) -> list[str]:
    """What ``Resources/`` holds once compiled: one ``.mlmodelc`` per package, and the CLIP BPE files."""
    return sorted([f"{s.name}.mlmodelc" for s in specs] + ["merges.txt", "vocab.json"])


COMPILE_SCRIPT = """#!/bin/sh
# Compiles Packages/*.mlpackage into Resources/*.mlmodelc for Apple's Swift StableDiffusion pipeline (needs Xcode).
set -eu
if [ "$(uname -s)" != "Darwin" ]; then
  echo "compile_models.sh: needs macOS with Xcode (xcrun coremlcompiler); this machine runs $(uname -s)" >&2
  exit 1
fi
cd "$(dirname "$0")"
for package in Packages/*.mlpackage; do
  echo "compiling $package"
  xcrun coremlcompiler compile "$package" Resources/
done
echo "Resources/ is ready for StableDiffusion{pipeline}(resourcesAt:)"
"""


def device_readme(pipe, specs: tuple[ComponentSpec, ...], attention: AttentionImplementation, compute_units: str) -> str:
    xl = type(pipe).__name__ == "StableDiffusionXLPipeline"
    pipeline = "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"
    call = (f"try {pipeline}(resourcesAt: resources, configuration: config, reduceMemory: false)" if xl else
            f"try {pipeline}(resourcesAt: resources, controlNet: [], configuration: config, disableSafety: true)")
    units = {"CPU_AND_NE": "cpuAndNeuralEngine", "ALL": "all", "CPU_ONLY": "cpuOnly", "CPU_AND_GPU": "cpuAndGPU"}
    unit = units.get(compute_units, "all")
    return f"""# On the device

This bundle follows the contract of Apple's Swift `StableDiffusion` package (apple/ml-stable-diffusion):
`Packages/` holds {', '.join(f'`{s.name}.mlpackage`' for s in specs)}; `Resources/` holds `vocab.json` and
`merges.txt`. Attention implementation: `{attention}`.

1. On a Mac with Xcode: `./compile_models.sh` compiles every package into `Resources/` (`xcrun coremlcompiler
   compile`), which then holds exactly: {', '.join(f'`{f}`' for f in contract_files(specs))}.
2. Command line, from a checkout of apple/ml-stable-diffusion:

   ```
   swift run StableDiffusionSample "a handwritten digit seven" --resource-path {'{'}this bundle{'}'}/Resources \\
       --compute-units {unit} --disable-safety --seed 0 --output-path out{' --xl' if xl else ''}
   ```

3. In an app:

   ```swift
   import CoreML
   import StableDiffusion

   let resources = Bundle.main.url(forResource: "Resources", withExtension: nil)!
   let config = MLModelConfiguration()
   config.computeUnits = .{unit}
   let pipeline = {call}
   try pipeline.loadResources()
   ```

The VAE decoder takes latents already divided by the scaling factor (the Swift decoder does that); its `image` is in
[-1, 1]. The UNet's latent size is read from its `sample` input; the scheduler config is `scheduler_config.json`
beside this file.
"""
