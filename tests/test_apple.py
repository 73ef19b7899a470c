"""Apple's layout: Core ML bundles that the Swift StableDiffusion pipeline loads as they are.

The contract is checked on each saved .mlpackage's spec (names, shapes, dtypes, output order), on the files
``Resources/`` will hold after ``compile_models.sh``, and numerically on the PyTorch wrappers (against the unwrapped
diffusers modules, and chunk 1 → chunk 2 against the whole UNet).
"""

import os
import subprocess

import pytest
import torch
from conftest import cli, error_line, export_options

from obsdiff.exporters.apple import (
    AttentionImplementation,
    apple_specs,
    attention_implementation,
    chunk_split,
    contract_files,
    layout_check,
)
from obsdiff.exporters.bundle import export
from obsdiff.exporters.components import pipeline_dims
from obsdiff.exporters.coreml import load_program
from obsdiff.exporters.profiles import Shapes
from obsdiff.prune import PruneConfig, prune
from obsdiff.pruned_folder import PrunedFolder, load_pipeline
from obsdiff.sparsity import Unstructured

FLOAT32 = 65568  # coremltools ArrayFeatureType.FLOAT32


def io_of(package) -> tuple[dict, list[str]]:
    spec, _ = load_program(package)
    inputs = {i.name: (list(i.type.multiArrayType.shape), i.type.multiArrayType.dataType) for i in spec.description.input}
    return inputs, [o.name for o in spec.description.output]


def assert_swift_contract(bundle, xl: bool, latent: int, chunked: bool, sequence: int = 77) -> None:
    """What Apple's Swift sources read, package by package (TextEncoder.swift, TextEncoderXL.swift, Unet.swift,
    Decoder.swift, StableDiffusionPipeline+Resources.swift)."""
    packages = bundle / "Packages"
    unets = ["UnetChunk1", "UnetChunk2"] if chunked else ["Unet"]
    names = ["TextEncoder"] + (["TextEncoder2"] if xl else []) + unets + ["VAEDecoder"]
    assert sorted(p.stem for p in packages.glob("*.mlpackage")) == sorted(names)
    compiled = sorted(f"{p.stem}.mlmodelc" for p in packages.glob("*.mlpackage"))
    assert sorted(compiled + [p.name for p in (bundle / "Resources").iterdir()]) == sorted(
        [f"{n}.mlmodelc" for n in names] + ["merges.txt", "vocab.json"])
    for encoder in names[: 2 if xl else 1]:
        inputs, outputs = io_of(packages / f"{encoder}.mlpackage")
        assert list(inputs) == ["input_ids"] and inputs["input_ids"] == ([1, sequence], FLOAT32)
        assert outputs == (["hidden_embeds", "pooled_outputs"] if xl else ["last_hidden_state", "pooled_outputs"])
    inputs, outputs = io_of(packages / f"{unets[0]}.mlpackage")
    sample_shape, sample_type = inputs["sample"]
    assert sample_shape == [2, 4, latent, latent] and sample_type == FLOAT32
    assert inputs["timestep"] == ([2], FLOAT32)
    states, _ = inputs["encoder_hidden_states"]
    assert states[0] == 2 and states[2] == 1 and states[3] == sequence  # (B, C, 1, S)
    if xl:
        assert inputs["time_ids"] == ([2, 6], FLOAT32) and inputs["text_embeds"][0][0] == 2
    last_inputs, last_outputs = io_of(packages / f"{unets[-1]}.mlpackage")
    assert last_outputs[0] == "noise_pred"
    if chunked:  # chunk 2 reads chunk 1's outputs and the original inputs (ManagedMLModel.predictions(from:))
        assert set(last_inputs) <= set(outputs) | set(inputs) and set(outputs) <= set(last_inputs)
    vae_inputs, vae_outputs = io_of(packages / "VAEDecoder.mlpackage")
    assert list(vae_inputs) == ["z"] and vae_inputs["z"][0] == [1, 4, latent, latent] and vae_outputs == ["image"]
    script = bundle / "compile_models.sh"
    assert os.access(script, os.X_OK)
    readme = (bundle / "README_DEVICE.md").read_text()
    pipeline = "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"
    assert f"{pipeline}(resourcesAt:" in readme and "swift run StableDiffusionSample" in readme
    assert ("--xl" in readme) == xl


@pytest.fixture(scope="module")
def default_ios(default_model, tmp_path_factory):
    """The default model pruned 50% and exported with `make export TARGET=ios`'s profile (Apple layout)."""
    root = tmp_path_factory.mktemp("ios_apple")
    prune(default_model, root / "model", PruneConfig(sparsity=Unstructured(0.5), num_prompts=4, steps=3, packages=1))
    manifest = export(root / "model", "ios", root / "bundle")
    return root, manifest


def test_default_model_ios_bundle_follows_the_swift_contract(default_ios):
    root, manifest = default_ios
    results = manifest["validation"]
    assert results["layout"] == "apple" and results["attention_implementation"] == "split-einsum"  # the ios profile
    assert_swift_contract(root / "bundle", xl=False, latent=8, chunked=False)
    assert results["contract_files"] == contract_files(tuple(
        s for s in apple_specs(load_pipeline(root / "model"), pipeline_dims(load_pipeline(root / "model"), Shapes()),
                               chunk=False)))
    unet = results["components"]["Unet"]
    assert unet["weights"]["checked"] > 20 and not unet["weights"]["failed"]  # sparse weights = the pruned ones
    assert min(unet["layout_cosine"].values()) >= 0.9999
    assert (root / "bundle" / "scheduler_config.json").is_file()
    assert cli("validate", root / "bundle").returncode == 0


def test_compile_script_refuses_off_macos_in_one_line(default_ios):
    root, _ = default_ios
    proc = subprocess.run([str(root / "bundle" / "compile_models.sh")], capture_output=True, text=True)
    if os.uname().sysname == "Darwin":
        pytest.skip("on macOS the script compiles with xcrun (needs Xcode)")
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1 and "needs macOS" in proc.stderr
    assert not list((root / "bundle" / "Resources").glob("*.mlmodelc"))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_chunks_equal_the_whole_unet_and_chain(family, tiny, default_model):
    """chunk 1 → chunk 2 in PyTorch equals the UNet (max abs ≤ 1e-5, fp32); chunk 2 reads chunk 1's outputs plus
    original inputs; the split is at the stage boundary closest to half the weights."""
    pipe = load_pipeline(default_model if family == "sd" else tiny("sdxl"))
    dims = pipeline_dims(pipe, Shapes())
    whole = next(s for s in apple_specs(pipe, dims, chunk=False) if s.name == "Unet")
    first, second = (s for s in apple_specs(pipe, dims, chunk=True) if s.name.startswith("UnetChunk"))
    inputs = whole.sample_inputs(dims)
    with torch.no_grad():
        ref = whole.wrapper(pipe.unet)(*inputs.values())
        middle = first.wrapper(pipe.unet)(*inputs.values())
        feeds = {t.name: v for t, v in zip(first.outputs, middle)} | inputs
        got = second.wrapper(pipe.unet)(*(feeds[t.name] for t in second.inputs))
    assert (got - ref).abs().max().item() <= 1e-5
    assert {t.name for t in second.inputs} <= {t.name for t in first.outputs} | {t.name for t in first.inputs}
    assert [tuple(v.shape) for v in middle] == [first.resolve(dims, t) for t in first.outputs]


def _stages_of(sizes: list[int]) -> torch.nn.Module:
    """A stand-in UNet whose down, mid and up stages hold these many parameters (no bias: exactly ``n`` each)."""
    unet = torch.nn.Module()
    down, mid, *up = sizes
    unet.down_blocks = torch.nn.ModuleList([torch.nn.Linear(down, 1, bias=False)])
    unet.mid_block = torch.nn.Linear(mid, 1, bias=False)
    unet.up_blocks = torch.nn.ModuleList([torch.nn.Linear(n, 1, bias=False) for n in up])
    return unet


@pytest.mark.parametrize("sizes,split", [([10, 10, 10, 10], 2), ([50, 1, 1, 48], 1), ([10, 30, 40, 20], 2),
                                         ([1, 1, 1, 97], 3)])
def test_chunk_split_halves_the_weights_at_a_stage_boundary(sizes, split):
    """Chunk 1 takes the first ``split`` stages (down, mid, up…), the boundary closest to half of all weights."""
    assert chunk_split(_stages_of(sizes)) == split


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_apple_wrappers_equal_the_original_modules(family, tiny):
    """Text encoder(s), UNet with both attention implementations, VAE decoder: cosine ≥ 0.9999 to diffusers."""
    pipe = load_pipeline(tiny(family))
    dims = pipeline_dims(pipe, Shapes(height=16, width=16))
    for impl in AttentionImplementation:
        for spec in apple_specs(pipe, dims, chunk=True):
            cosines = layout_check(pipe, spec, dims, impl)
            assert spec.name == "UnetChunk2" or cosines, spec.name
            assert all(c >= 0.9999 for c in cosines.values()), (spec.name, impl, cosines)
    # split-einsum really is another computation (not the default processor under another name), and is undone
    spec = next(s for s in apple_specs(pipe, dims, chunk=False) if s.name == "Unet")
    before = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    with attention_implementation(pipe.unet, AttentionImplementation.SPLIT_EINSUM):
        assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"SplitEinsumAttnProcessor"}
        with torch.no_grad():
            spec.wrapper(pipe.unet)(*spec.sample_inputs(dims).values())
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == before


def test_chunked_bundle_reads_each_pruned_weight_from_one_chunk(tiny, tmp_path):
    """--chunk-unet on a pruned SDXL UNet: both chunks pass their gates, the Swift contract holds (XL, chunked), and
    each pruned weight is read back from exactly one chunk. (Merged from one SD and one dense SDXL export: the pruned
    SDXL covers both.)"""
    model = tmp_path / "model"
    prune(tiny("sdxl"), model, PruneConfig(sparsity=Unstructured(0.5), num_prompts=2, steps=2, packages=1, height=16,
                                           width=16))
    manifest = export(model, "ios", tmp_path / "xl", export_options(apple=_options(chunk_unet=True), height=16, width=16))
    results = manifest["validation"]
    checked = [set(results["components"][c]["sparsity"]["layers"]) for c in ("UnetChunk1", "UnetChunk2")]
    pruned = {r.layer for r in PrunedFolder.open(model).layers("unet")}
    assert checked[0] and checked[1] and not checked[0] & checked[1] and checked[0] | checked[1] == pruned
    dims = pipeline_dims(load_pipeline(model), Shapes(height=16, width=16))
    assert_swift_contract(tmp_path / "xl", xl=True, latent=dims["latent_height"], chunked=True,
                          sequence=dims["text_encoder.sequence"])


def _options(**kwargs):
    from obsdiff.exporters.apple import AppleOptions

    return AppleOptions(**kwargs)


def test_apple_layout_bad_input(tiny, default_model, tmp_path):
    """One line, non-zero exit, no bundle."""
    cases = [
        ((default_model, "--chunk-unet", "--layout", "ours"), "use it with --layout apple"),
        ((default_model, "--attention-implementation", "flash"), "must be original or split-einsum"),
        ((default_model, "--layout", "android"), "--layout must be apple or ours"),
        ((tiny("flux"), "--height", "16", "--width", "16"), "cannot run FluxPipeline"),
        ((default_model, "--target", "cpu", "--layout", "apple"), "apply to Core ML targets"),
    ]
    for i, (args, message) in enumerate(cases):
        target = [] if "--target" in args else ["--target", "ios"]
        proc = cli("export", *args, *target, "--out", tmp_path / f"b{i}")
        assert proc.returncode != 0 and message in error_line(proc), (args, proc.stderr[-500:])
    proc = cli("ship", "--target", "ios", "--model", default_model, "--out", tmp_path / "s", "--chunk-unet",
                   "--layout", "ours")
    assert proc.returncode != 0 and "use it with --layout apple" in error_line(proc)
    assert not list(tmp_path.iterdir())
