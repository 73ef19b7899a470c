"""Core ML: conversion, sparse storage of exactly the OBS zeros, size, IO; prediction only on macOS."""

import json
import platform
import shutil

import pytest
from conftest import cli, error_line, export_options

from obsdiff.errors import UsageError
from obsdiff.exporters.apple import AppleOptions, Layout
from obsdiff.exporters.bundle import export
from obsdiff.exporters.coreml import stored_weights
from obsdiff.exporters.export_plan import resolve_deployment_target
from obsdiff.prune import PruneConfig, prune
from obsdiff.pruned_folder import load_pipeline
from obsdiff.sparsity import Unstructured


@pytest.fixture(scope="module")
def ios_bundle(pruned_tiny, tmp_path_factory):
    """The tiny UNet pruned 50% and exported for iOS with our own IO (``--layout ours``; Apple's layout is
    tests/test_apple.py). (2:4 in Core ML's sparse storage: tests/test_int8_export.py, jointly with int8 codes.)"""
    root = tmp_path_factory.mktemp("ios")
    shutil.copytree(pruned_tiny, root / "model")  # the shared prune
    export(root / "model", "ios", root / "bundle", export_options(apple=AppleOptions(layout=Layout.OURS)))
    return root


def test_sparse_unet_weights_and_size(ios_bundle):
    manifest = json.loads((ios_bundle / "bundle" / "manifest.json").read_text())
    results = manifest["validation"]
    unet = results["components"]["unet"]
    assert manifest["components"]["unet"]["sparsity"]["zero_fraction_export"] == pytest.approx(0.5, abs=0.02)
    assert unet["weights"]["checked"] > 100 and not unet["weights"]["failed"]  # (a)
    assert unet["weight_bytes"] <= unet["size_limit_bytes"] < 0.7 * unet["dense_weight_bytes"]  # (b)
    assert unet["io"]["passed"]  # (c)
    packages = {"text_encoder": "TextEncoder", "unet": "Unet", "vae_decoder": "VAEDecoder"}
    assert manifest["components"].keys() <= packages.keys() and "unet" in manifest["components"]
    for package in (packages[name] for name in manifest["components"]):
        assert (ios_bundle / "bundle" / "Resources" / f"{package}.mlpackage").is_dir()
    for name in ("vocab.json", "merges.txt", "scheduler_config.json"):
        assert (ios_bundle / "bundle" / "Resources" / name).is_file()


def test_zero_positions_read_back_from_the_package(ios_bundle):
    """Independent of the builder: decompress the stored sparse weights and compare with PyTorch."""
    pipe = load_pipeline(ios_bundle / "model")
    stored = stored_weights(ios_bundle / "bundle" / "Resources" / "Unet.mlpackage")
    w = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2].weight.detach().numpy()
    got = stored["model_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2_weight_to_fp16_sparsified"]
    assert ((got == 0) == (w == 0)).all() and abs((got == 0).mean() - 0.5) < 0.02


def test_prediction_is_skipped_with_a_reason_off_macos(ios_bundle):
    manifest = json.loads((ios_bundle / "bundle" / "manifest.json").read_text())
    pred = manifest["validation"]["components"]["unet"]["prediction"]
    if platform.system() == "Darwin":
        assert pred["status"] == "ran"
    else:
        assert pred["status"] == "skipped" and "macOS" in pred["reason"]
        assert "Core ML prediction needs macOS" in (ios_bundle / "bundle" / "report.md").read_text()


def test_validate_detects_a_missing_weight_file(ios_bundle, tmp_path):
    assert cli("validate", ios_bundle / "bundle").returncode == 0
    copy = tmp_path / "b"
    shutil.copytree(ios_bundle / "bundle", copy)
    (copy / "Resources" / "Unet.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").unlink()
    proc = cli("validate", copy)
    assert proc.returncode != 0 and "missing file Resources/Unet.mlpackage" in error_line(proc)


def test_deployment_target_rules(tmp_path, ios_bundle):
    assert resolve_deployment_target(None, "iOS17", None) == "iOS17"
    assert resolve_deployment_target(None, "iOS17", "palettize-4bit") == "iOS18"  # raised automatically
    with pytest.raises(UsageError, match="minimum is iOS18"):
        resolve_deployment_target("iOS17", "iOS17", "int8")
    proc = cli("export", ios_bundle / "model", "--target", "ios", "--out", tmp_path / "x", "--layout", "ours",
                   "--compress", "palettize-4bit", "--deployment-target", "iOS16")
    assert proc.returncode != 0 and "the minimum is iOS18" in error_line(proc)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("family,kwargs,packages", [
    ("sd3", {"t5": True}, ("TextEncoder", "TextEncoder2", "TextEncoderT5", "MultiModalDiffusionTransformer", "VAEDecoder")),
    ("flux", {}, ("TextEncoder", "TextEncoderT5", "FluxTransformer", "VAEDecoder")),
])
def test_transformer_app_bundles(family, kwargs, packages, tiny, tmp_path):
    """Transformer families: Apple's resource names (a T5 is TextEncoderT5 whichever slot it fills), the T5
    tokenizer files, and (a) (b) (c) on the transformer.

    Much of a tiny transformer stays dense (AdaLN modulation, embedders), so (b) uses the share of the weight
    blob the zeros free, not the pruned layers' sparsity.
    """
    prune(tiny(family, **kwargs), tmp_path / "model", PruneConfig(sparsity=Unstructured(0.5), num_prompts=2, steps=2, packages=1))
    manifest = export(tmp_path / "model", "ios", tmp_path / "bundle",  # Apple's Swift pipeline has no layout for them
                      export_options(height=16, width=16, apple=AppleOptions(layout=Layout.OURS)))
    results = manifest["validation"]
    resources = tmp_path / "bundle" / "Resources"
    assert sorted(p.stem for p in resources.glob("*.mlpackage")) == sorted(packages)
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "scheduler_config.json"):
        assert (resources / name).is_file(), name
    transformer = results["components"]["transformer"]
    assert transformer["weights"]["checked"] > 10 and not transformer["weights"]["failed"]
    assert 0.1 < transformer["component_sparsity"] < transformer["pruned_sparsity"]
    assert transformer["weight_bytes"] <= transformer["size_limit_bytes"] < transformer["dense_weight_bytes"]
    if family == "sd3":  # every CLIP hidden state is an output (SD3 reads the penultimate), with Core ML-safe names
        outputs = results["components"]["text_encoder"]["io"]["outputs"]
        assert outputs[:2] == ["text_embeds", "last_hidden_state"] and outputs[-1] == "hidden_states_2"
