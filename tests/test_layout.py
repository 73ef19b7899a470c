"""One package: the typed sparsity spec, import contracts (no cycles), and a wheel that works from anywhere."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, cli, error_line

from obsdiff.errors import UsageError
from obsdiff.exporters.profiles import load_profile
from obsdiff.exporters.ship import resolve_pattern
from obsdiff.prune import PruneConfig
from obsdiff.pruned_folder import PrunedFolder
from obsdiff.solver import obs_prune
from obsdiff.sparsity import (
    NM,
    Allocation,
    Budget,
    Dense,
    Measure,
    PatternError,
    Structured,
    Unstructured,
    from_json,
    parse_kind,
    parse_sparsity,
    to_json,
)

BIN = Path(sys.executable).parent


# ---- the typed pattern -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text,sparsity,expect", [
    ("unstructured", None, Unstructured(0.5)), ("unstructured", 0.7, Unstructured(0.7)), ("2:4", None, NM(2, 4)),
    (" 2:4 ", None, NM(2, 4)), ("4:8", 0.5, NM(4, 8)), ("1:4", None, NM(1, 4)), ("2:5", None, NM(2, 5)),
    ("structured", None, Structured(0.3, 0.3, 0.3)), ("structured", 0.2, Structured(0.2, 0.2, 0.2)),
    ("dense", None, Dense()),
    ("structured", {"flops": 0.7}, Structured(budget=Budget(Measure.FLOPS, 0.7, Allocation.GLOBAL))),
    ("structured", {"params": 0.5, "allocation": "uniform"},
     Structured(budget=Budget(Measure.PARAMS, 0.5, Allocation.UNIFORM))),
    ("structured", {"channel_sparsity": 0.5}, Structured(0.3, 0.3, 0.5)),
])
def test_patterns_parse_once_and_round_trip(text, sparsity, expect):
    options = sparsity if isinstance(sparsity, dict) else {}
    spec = parse_sparsity(text, None if options else sparsity, **options)
    assert spec == expect
    assert from_json(json.loads(json.dumps(to_json(spec)))) == spec
    assert parse_kind(str(spec)) == str(spec)


@pytest.mark.parametrize("text,sparsity,message", [
    ("2:4", 0.3, "means sparsity 0.5"), ("4:2", None, "0 < N < M"), ("2:x", None, "N:M such as 2:4"),
    ("unstructured", 1.0, "(0, 1)"), ("unstructured", float("nan"), "must be a number"), ("dense", 0.5, "no sparsity"),
    ("sparse", None, "pattern must be"), ("structured", {"flops": 1.0}, "--flops must be a fraction in (0, 1)"),
    ("structured", {"flops": 0.7, "allocation": "greedy"}, "--allocation must be global or uniform"),
    ("2:4", {"params": 0.7}, "--params is a budget for --pattern structured"),
    ("structured", {"allocation": "uniform"}, "applies to a budget"),
])
def test_bad_patterns_are_one_clear_error(text, sparsity, message):
    options = sparsity if isinstance(sparsity, dict) else {}
    with pytest.raises(PatternError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_sparsity(text, None if options else sparsity, **options)


def test_nm_checker_runs_along_the_given_axis():
    w = np.array([[0, 0, 1, 1, 0, 1, 0, 1]], dtype=np.float32)  # 2:4 along axis 1
    assert NM(2, 4).holds(w, axis=1)
    assert not NM(2, 4).holds(w.T.reshape(4, 2), axis=0)
    assert not NM(2, 4).holds(np.ones((4, 6)), axis=1)  # 6 does not split into groups of 4
    assert not NM(3, 4).holds(w, axis=1)


def test_n_of_m_whose_m_does_not_divide_the_solver_block():
    """2:5 used to crash in a reshape on any layer wider than 128 columns (128-column blocks assumed M | 128)."""
    torch.manual_seed(0)
    x = torch.randn(512, 250)
    w = torch.randn(16, 250)
    res = obs_prune(w, 2 * x.T @ x / 512, NM(2, 5))
    assert NM(2, 5).holds(res.weight.numpy(), axis=1)
    assert (res.weight == 0).float().mean().item() == pytest.approx(0.4)


def test_spaced_pattern_is_canonical_in_the_record_and_the_tensorrt_preflight_accepts_it(tiny, tmp_path):
    """``--pattern " 2:4"`` pruned 2:4 but was recorded as " 2:4", which the jetson preflight then refused."""
    out = tmp_path / "m"
    assert cli("prune", tiny("sd"), "--out", out, "--pattern", " 2:4", "--num-prompts", "2", "--steps", "2",
               "--packages", "1").returncode == 0
    assert json.loads((out / "pruning.json").read_text())["settings"]["pattern"] == "2:4"  # on disk, canonical
    spec = PrunedFolder.open(out).sparsity
    assert spec == NM(2, 4)
    load_profile("jetson").check_pattern(spec, force=False)


def test_a_one_of_four_profile_needs_no_sparsity(tmp_path):
    """A profile with pattern 1:4 used to fail unless it also said sparsity = 0.25."""
    path = tmp_path / "cpu14.toml"
    path.write_text('name = "cpu14"\nformat = "onnx"\nprecision = "fp32"\n[prune]\npattern = "1:4"\n')
    profile = load_profile(path)
    spec = resolve_pattern(profile, None, None)
    assert spec == NM(1, 4)
    PruneConfig(sparsity=spec).validate()
    assert resolve_pattern(profile, "unstructured", 0.3) == Unstructured(0.3)
    with pytest.raises(UsageError, match="means sparsity 0.25"):
        resolve_pattern(profile, None, 0.5)


# ---- import contracts ----------------------------------------------------------------------------------


def _flat_install(target: Path) -> None:
    """The package as a wheel lays it out (exporters/, targets/ inside obsdiff/), which grimp needs to walk."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-compile",
                    "--target", str(target), str(REPO)], check=True, capture_output=True)


def _lint_imports(site: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lint-imports"), str(REPO / "pyproject.toml")], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(site)})


def test_import_contracts_hold_and_a_cycle_breaks_them(tmp_path):
    site = tmp_path / "site"
    _flat_install(site)
    proc = _lint_imports(site, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "5 kept, 0 broken" in proc.stdout
    registry = site / "obsdiff" / "exporters" / "registry.py"
    registry.write_text(registry.read_text() + "\n\ndef _cycle():\n    from obsdiff.exporters import bundle  # noqa\n")
    proc = _lint_imports(site, tmp_path)
    assert proc.returncode != 0 and "No import cycles" in proc.stdout and "BROKEN" in proc.stdout
    assert ".registry -> .bundle" in proc.stdout


# ---- the wheel -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wheel_installs_and_runs_from_another_directory(tmp_path):
    """A non-editable install finds its profiles and prompt sets (package data) wherever it runs."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True)
    wheel = next(dist.glob("obsdiff-*.whl"))
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install", "-q",
                    "--no-deps", str(wheel)], check=True, capture_output=True)
    # The heavy dependencies (torch, diffusers, ...) come from the dev environment, after the wheel's own files.
    site = Path(subprocess.check_output([str(env_dir / "bin" / "python"), "-c",
                                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    obsdiff = str(env_dir / "bin" / "obsdiff")

    where = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import obsdiff.exporters, obsdiff.targets; "
                            "print(obsdiff.exporters.__file__, obsdiff.targets.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, env=env, check=True).stdout
    assert str(REPO) not in where and str(env_dir) in where
    model = REPO / "models" / "digits-sd"
    info = subprocess.run([obsdiff, "info", str(model)], cwd=elsewhere, capture_output=True, text=True, env=env)
    assert info.returncode == 0, info.stderr[-2000:]
    assert "UNet2DConditionModel" in info.stdout
    export = subprocess.run([obsdiff, "-q", "export", str(model), "--target", "cpu", "--out", "bundle"], cwd=elsewhere,
                            capture_output=True, text=True, env=env)
    assert export.returncode == 0, export.stderr[-2000:]
    assert (elsewhere / "bundle" / "manifest.json").is_file()
    bad = subprocess.run([obsdiff, "export", str(model), "--target", "nope", "--out", "b2"], cwd=elsewhere,
                         capture_output=True, text=True, env=env)
    shipped = ", ".join(sorted(p.stem for p in (REPO / "targets").glob("*.toml")))  # every profile is in the wheel
    assert bad.returncode != 0 and f"available: {shipped}" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_readme_layout_section_matches_the_tree():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("```", 2)[1]
    named = [line.split()[0].rstrip("/") for line in section.strip().splitlines() if line and not line.startswith(" ")]
    for name in named:
        assert (REPO / name).exists(), f"README layout names {name}, which is not in the tree"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    top = {p.split("/")[0] for p in tracked if "/" in p and not p.startswith(".")}
    assert top <= set(named), f"top-level folders missing from the README layout: {sorted(top - set(named))}"


def test_pattern_errors_on_the_command_line_are_one_line(default_model, tmp_path):
    for args, message in ((["--pattern", "2:x"], "N:M such as 2:4"), (["--pattern", "dense"], "prunes nothing"),
                          (["--sparsity", "nan"], "finite number")):
        proc = cli("prune", default_model, "--out", tmp_path / "o", *args)
        assert proc.returncode != 0 and message in error_line(proc)
    assert not (tmp_path / "o").exists()


# ---- the shape of the code -------------------------------------------------------------------------------


def _sources() -> list[Path]:
    return sorted([*(REPO / "obsdiff").rglob("*.py"), *(REPO / "exporters").rglob("*.py")])


def test_functions_and_classes_stay_short():
    """No function or method over 80 lines and no class over 200 in the package (the driver grew to 300)."""
    import ast

    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > 80:
                long.append(f"{path.relative_to(REPO)}:{node.name} {lines} lines")
            elif isinstance(node, ast.ClassDef) and lines > 200:
                long.append(f"{path.relative_to(REPO)}:class {node.name} {lines} lines")
    assert not long, long


def test_only_the_pruned_folder_module_names_the_record_files():
    """A pruned folder's record and scales are read and written by ``obsdiff.pruned_folder`` alone: no other module
    has their file names in its code (docstrings and comments may mention them)."""
    import ast

    from obsdiff.pruned_folder import RECORD_FILE, SCALES_FILE

    def docstrings(tree) -> set[int]:
        ids = set()
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                    isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                ids.add(id(body[0].value))
        return ids

    named = []
    for path in _sources():
        if path.name == "pruned_folder.py":
            continue
        tree = ast.parse(path.read_text())
        skip = docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip and (
                    RECORD_FILE in node.value or SCALES_FILE in node.value):
                named.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not named, named
