"""``obsdiff recover``: distil a pruned denoiser from its dense teacher, with every structural promise kept.

Data-free: the teacher generates the calibration prompts (its own trajectories, classifier-free-guidance batches
included) and every denoiser call it makes is kept with its output. The teacher is then let go; the student (the
pruned denoiser, at its pruned shapes) learns to give the teacher's output on the teacher's inputs (mean squared
error), with AdamW and a cosine schedule. What the prune promised holds after every step:
- the zeros of every layer the prune masked stay exactly zero (their gradients are masked, the weights re-masked),
  so N:M holds on TensorRT's axis as it did;
- a structurally shrunk denoiser keeps its shapes (it is trained as it was loaded);
- a quantized folder is refused: its weights would leave their grid (recover the float prune, then quantize).

Memory is planned before anything heavy loads: the teacher pipeline while it records, then the student's weights,
gradients and Adam moments, the recorded calls, and one training step's activations (measured on ``meta``); when
that is over ``--max-memory``, gradient checkpointing is switched on, and a plan still over is refused in one line.
The run checkpoints into ``.OUT.obsdiff-recover`` beside the output every ``checkpoint_every`` steps (weights, Adam
moments, loss curve, the recording); ``--resume`` continues from there.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import time
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from obsdiff.atomic import (
    OutputLock,
    check_output_dir,
    discard_staging,
    fault_point,
    remove,
    replace_dir,
    staging_path,
    write_bytes_atomic,
)
from obsdiff.calibration import CalibrationSettings, capture_call, run_pipeline
from obsdiff.checks import check_number, check_whole
from obsdiff.config import denoiser_name
from obsdiff.errors import UsageError
from obsdiff.hessian import StepContext
from obsdiff.lean import held_bytes
from obsdiff.model_io import copy_model_files
from obsdiff.plan import GIB, activation_bytes, available_memory, batched_like, current_rss, peak_rss, training_activation_bytes
from obsdiff.prune import read_prompts
from obsdiff.pruned_folder import (
    RECORD_FILE,
    PrunedFolder,
    PruningRecord,
    RecoveryRecord,
    folder_fingerprint,
    write_pruned_folder,
)

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIX = ".obsdiff-recover"
ADAM_STATES = 2  # AdamW's two moments per parameter
# The meta measurement sees the forward's saved activations, not the backward (autograd runs it outside the dispatch
# mode): the backward is counted as BACKWARD_FACTOR more of them (each saved activation's gradient, and the
# gradients in flight). SD 1.5 at 256 px, batch 2 (benchmarks/results/scale.md): base 0.22 + 4 × 3.20 GiB
# (weights, gradients, two moments) + 0.78 GiB saved measured 15.64 GiB, 1.84 GiB (2.4 × the saved) above them.
BACKWARD_FACTOR = 3


@dataclass(frozen=True)
class RecoverConfig:
    """What one recovery is asked to do; ``None`` fields take the prune's own settings (its record)."""

    steps: int = 2000
    lr: float = 1e-3
    batch_size: int = 64  # denoiser rows (one prompt's conditional or unconditional half at one step) per step
    trajectory_steps: int = 25  # denoising steps of each teacher trajectory (the evaluation and export use 25)
    # trajectories, cycling through the calibration prompts with new noise: on the default model 64 (one per prompt)
    # overfit (70%: 0.880 after 2,000 steps, 0.815 after 4,000), 256 did not (0.955 after 2,000)
    num_prompts: int | None = 256
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    warmup: int = 50
    seed: int = 0
    max_memory_gib: float | None = None
    gradient_checkpointing: bool | None = None  # None: only when the plan needs it
    checkpoint_every: int = 100

    def validate(self) -> None:
        check_whole("--steps", self.steps, 1)
        check_number("--lr", self.lr, 0.0, 1.0, open_low=True)
        check_whole("--batch-size", self.batch_size, 1)
        check_whole("--trajectory-steps", self.trajectory_steps, 1)
        if self.num_prompts is not None:
            check_whole("--num-prompts", self.num_prompts, 1)
        if self.guidance is not None:
            check_number("--guidance", self.guidance, 0.0)
        for name, value in (("--height", self.height), ("--width", self.width)):
            if value is not None:
                check_whole(name, value, 8)
                if value % 8:
                    raise UsageError(f"{name} must be a multiple of 8, got {value}")
        check_whole("--warmup", self.warmup, 0)
        check_whole("--seed", self.seed, 0)
        if self.max_memory_gib is not None:
            check_number("--max-memory", self.max_memory_gib, 0.0, open_low=True)
        check_whole("--checkpoint-every", self.checkpoint_every, 1)

    def to_json(self) -> dict:
        return asdict(self)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine to zero."""
        warmup = min(self.warmup, self.steps // 10)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        return self.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(self.steps - warmup, 1)))


@dataclass
class TeacherCalls:
    """Every denoiser call of the teacher's generation: its inputs (flattened) and its output.

    ``leaves[i]``: call i's inputs as pytree leaves (one structure, ``spec``, for all); ``per_row[k]``: whether leaf
    k is split by rows (a tensor whose first dim is the call's batch, or a scalar timestep, repeated per row)."""

    spec: object
    leaves: list[list]
    targets: list[torch.Tensor]
    per_row: list[bool]

    @property
    def rows(self) -> int:
        return sum(int(t.shape[0]) for t in self.targets)

    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for tensor in [x for call in self.leaves for x in call if isinstance(x, torch.Tensor)] + self.targets:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
        return total

    def index(self) -> torch.Tensor:
        """(call, row) of every training row."""
        return torch.tensor([(c, r) for c, t in enumerate(self.targets) for r in range(int(t.shape[0]))])

    def batch(self, picks: torch.Tensor) -> tuple[tuple, dict, torch.Tensor]:
        """The denoiser inputs and the teacher's output for the chosen (call, row) pairs, as one batch."""
        leaves = []
        for k, split in enumerate(self.per_row):
            if not split:
                leaves.append(self.leaves[int(picks[0, 0])][k])
                continue
            parts = []
            for call, row in picks.tolist():
                value = self.leaves[call][k]
                if value.dim() == 0:  # a scalar timestep: one per row
                    parts.append(value.reshape(1))
                elif value.shape[0] != self.targets[call].shape[0]:  # one value for every row of the call
                    parts.append(value[:1])
                else:
                    parts.append(value[row : row + 1])
            leaves.append(torch.cat(parts))
        args, kwargs = torch.utils._pytree.tree_unflatten(leaves, self.spec)
        target = torch.cat([self.targets[c][r : r + 1] for c, r in picks.tolist()])
        return args, kwargs, target

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Flat tensors (each shared tensor once) and a JSON description: what the checkpoint keeps."""
        tensors: dict[str, torch.Tensor] = {}
        keys: dict[int, str] = {}

        def key(value: torch.Tensor) -> str:
            if id(value) not in keys:
                keys[id(value)] = name = str(len(keys))
                tensors[name] = value.detach().contiguous()
            return keys[id(value)]

        calls = [[{"tensor": key(x)} if isinstance(x, torch.Tensor) else {"value": x} for x in leaves]
                 for leaves in self.leaves]
        return tensors, {"calls": calls, "targets": [key(t) for t in self.targets], "per_row": self.per_row,
                         "spec": torch.utils._pytree.treespec_dumps(self.spec)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> TeacherCalls:
        leaves = [[tensors[x["tensor"]] if "tensor" in x else x["value"] for x in call] for call in meta["calls"]]
        return cls(torch.utils._pytree.treespec_loads(meta["spec"]), leaves, [tensors[k] for k in meta["targets"]],
                   list(meta["per_row"]))


def record_teacher(pipe, denoiser: nn.Module, prompts: list[str], config: RecoverConfig) -> TeacherCalls:
    """Generate every prompt with the teacher and keep each denoiser call's inputs and output. An input tensor the
    pipeline passes again unchanged (a prompt batch's text states, at every step) is kept once."""
    spec = None
    leaves: list[list] = []
    targets: list[torch.Tensor] = []
    copies: dict[int, tuple[weakref.ref, torch.Tensor]] = {}  # id → (the pipeline's tensor, weakly; our copy)

    def keep(x):
        if not isinstance(x, torch.Tensor):
            return x
        seen = copies.get(id(x))
        if seen is None or seen[0]() is not x:  # a freed tensor whose id was reused never matches
            seen = copies[id(x)] = (weakref.ref(x), x.detach().clone())
        return seen[1]

    def hook(_module, args, kwargs, output) -> None:
        nonlocal spec
        flat, this_spec = torch.utils._pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec is None:
            spec = this_spec
        elif this_spec != spec:
            raise UsageError("the teacher's denoiser calls change their structure during generation; recover "
                             "supports pipelines whose denoiser is called the same way at every step")
        leaves.append([keep(x) for x in flat])
        targets.append((output[0] if isinstance(output, (tuple, list)) else output.sample).detach().clone())

    settings = CalibrationSettings(prompts, config.trajectory_steps, config.guidance, config.height, config.width,
                                   config.seed, batch_size=16)
    handle = denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run_pipeline(pipe, settings, StepContext(), decode=False, desc="record teacher")
    finally:
        handle.remove()
    batch = int(targets[0].shape[0])
    per_row = [isinstance(x, torch.Tensor) and (x.dim() == 0 or x.shape[0] in (batch, 1)) for x in leaves[0]]
    return TeacherCalls(spec, leaves, targets, per_row)


def denoiser_config(folder: Path, name: str) -> dict:
    path = folder / name / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read the denoiser's config ({exc})") from None
    return {k: v for k, v in data.items() if not k.startswith("_")}


def check_inputs(pruned: PrunedFolder, teacher_dir: Path, out_dir: Path | None,
                 overwrite: bool) -> tuple[str, PrunedFolder]:
    """Every one-line refusal, before anything loads (``out_dir`` None: a plan, which writes nothing): returns the
    denoiser's name and the opened teacher."""
    record = pruned.record
    if record is None:
        raise UsageError(f"{pruned.path} was never pruned (no {RECORD_FILE}): recover distils a folder written by "
                         "obsdiff prune")
    if record.settings.quantization is not None or pruned.quantization:
        raise UsageError(f"{pruned.path} is quantized ({record.settings.quantization}): training would move its "
                         "weights off their grid; recover the float prune, then quantize the recovered folder")
    name = denoiser_name(pruned.model_index)
    if name is None:
        raise UsageError(f"{pruned.path} has no denoiser (unet or transformer) to recover")
    if not teacher_dir.exists():
        raise UsageError(f"teacher folder {teacher_dir} does not exist (pass --teacher DENSE: the folder the prune "
                         "started from)")
    teacher = PrunedFolder.open(teacher_dir)
    if denoiser_name(teacher.model_index) != name:
        raise UsageError(f"teacher {teacher_dir} has no {name}: its architecture differs from {pruned.path}")
    student_config, teacher_config = denoiser_config(pruned.path, name), denoiser_config(teacher_dir, name)
    if student_config != teacher_config:
        differing = sorted(k for k in set(student_config) | set(teacher_config)
                           if student_config.get(k) != teacher_config.get(k))
        raise UsageError(f"teacher {teacher_dir}: its {name} architecture differs from {pruned.path}'s "
                         f"({', '.join(differing[:4])} differ)")
    if out_dir is None:
        return name, teacher
    check_output_dir(out_dir, {"pruned folder": pruned.path, "teacher": teacher_dir}, overwrite)
    return name, teacher


def plan_memory(teacher_pipe, name: str, config: RecoverConfig, prompts: int, student_bytes: int,
                student_pipeline_bytes: int, budget: int, base: int) -> dict:
    """The expected peak of each phase (teacher recording; student training), from the teacher's first call;
    ``base``: the process's resident memory before the teacher loaded."""
    denoiser = teacher_pipe.components[name]
    call = capture_call(teacher_pipe, name, "a", config.guidance, config.height, config.width)
    cfg_batch = call.batch
    record_activations, _ = activation_bytes(call.module, call.args, call.kwargs)
    # the recording: per call its inputs and output (the text states once per prompt batch)
    sample = call.args[0] if call.args else call.kwargs.get("sample", call.kwargs.get("hidden_states"))
    per_row_step = 2 * sample[:1].numel() * sample.element_size()  # the latents in, the teacher's output
    per_row_prompt = sum(x[:1].numel() * x.element_size() for x in torch.utils._pytree.tree_leaves(call.kwargs)
                         if isinstance(x, torch.Tensor) and x is not sample and x.dim() and x.shape[0] == cfg_batch)
    recording = prompts * cfg_batch * (config.trajectory_steps * per_row_step + per_row_prompt)
    teacher_bytes = held_bytes(teacher_pipe)
    args, kwargs = batched_like(call.args, call.kwargs, cfg_batch, config.batch_size)

    def training(checkpointing: bool) -> int:
        if checkpointing:
            denoiser.enable_gradient_checkpointing()
        try:
            return training_activation_bytes(denoiser, args, kwargs)
        finally:
            if checkpointing:
                denoiser.disable_gradient_checkpointing()

    checkpointing = bool(config.gradient_checkpointing)
    activations = training(checkpointing)
    weights = student_bytes * (2 + ADAM_STATES)  # weights, gradients, moments

    def peak(acts: int) -> int:
        return base + max(teacher_bytes + record_activations + recording, student_pipeline_bytes + recording,
                          weights + recording + acts * (1 + BACKWARD_FACTOR))

    if config.gradient_checkpointing is None and peak(activations) > budget:
        checkpointing, activations = True, training(True)
    return {"budget_bytes": budget, "base_bytes": base, "teacher_bytes": teacher_bytes,
            "recording_bytes": recording, "record_activation_bytes": record_activations,
            "student_bytes": student_bytes, "gradient_bytes": student_bytes,
            "optimizer_bytes": student_bytes * ADAM_STATES, "training_activation_bytes": activations,
            "backward_bytes": activations * BACKWARD_FACTOR, "gradient_checkpointing": checkpointing,
            "expected_peak_bytes": peak(activations)}


class RecoverCheckpoint:
    """The run's state beside the output: the recording (once), then weights, Adam moments and the loss curve."""

    def __init__(self, out_dir: Path) -> None:
        self.folder = out_dir.with_name(f".{out_dir.name}{CHECKPOINT_SUFFIX}")

    def discard(self) -> None:
        remove(self.folder)

    def save_recording(self, calls: TeacherCalls, fingerprint: str) -> None:
        from safetensors.torch import save

        self.folder.mkdir(exist_ok=True)
        tensors, meta = calls.to_tensors()
        write_bytes_atomic(self.folder / "recording.safetensors", save(tensors))
        write_bytes_atomic(self.folder / "recording.json", json.dumps({"fingerprint": fingerprint, **meta}).encode())

    def load_recording(self, fingerprint: str) -> TeacherCalls | None:
        from safetensors.torch import load_file

        try:
            meta = json.loads((self.folder / "recording.json").read_text())
            if meta.get("fingerprint") != fingerprint:
                return None
            return TeacherCalls.from_tensors(load_file(self.folder / "recording.safetensors"), meta)
        except (OSError, ValueError, KeyError):
            return None

    def save_state(self, student: nn.Module, optimizer: torch.optim.Optimizer, progress: dict) -> None:
        from safetensors.torch import save

        tensors = {f"weight.{k}": v.detach().contiguous() for k, v in student.state_dict().items()}
        names = {id(p): n for n, p in student.named_parameters()}
        for param, state in optimizer.state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                tensors[f"{key}.{names[id(param)]}"] = state[key].contiguous()
            tensors[f"step.{names[id(param)]}"] = torch.as_tensor(state["step"]).reshape(1).float()
        write_bytes_atomic(self.folder / "state.safetensors", save(tensors))
        write_bytes_atomic(self.folder / "progress.json", json.dumps(progress).encode())  # last: names a whole state

    def load_state(self, student: nn.Module, optimizer: torch.optim.Optimizer, fingerprint: str) -> dict | None:
        from safetensors.torch import load_file

        try:
            progress = json.loads((self.folder / "progress.json").read_text())
            if progress.get("fingerprint") != fingerprint:
                return None
            tensors = load_file(self.folder / "state.safetensors")
        except (OSError, ValueError):
            return None
        student.load_state_dict({k[len("weight."):]: v for k, v in tensors.items() if k.startswith("weight.")})
        for name, param in student.named_parameters():
            if f"exp_avg.{name}" in tensors:
                optimizer.state[param] = {"step": tensors[f"step.{name}"].reshape(()),
                                          "exp_avg": tensors[f"exp_avg.{name}"],
                                          "exp_avg_sq": tensors[f"exp_avg_sq.{name}"]}
        return progress


def masks_of(record: PruningRecord, name: str, student: nn.Module) -> dict[str, torch.Tensor]:
    """The zeros the prune made: parameter name → where the weight may be non-zero, for every masked layer."""
    params = dict(student.named_parameters())
    masks = {}
    for layer in record.layers:
        if layer.component == name and layer.sparsity > 0:
            weight = params.get(f"{layer.layer}.weight")
            if weight is None:
                raise UsageError(f"the record names {layer.name}, which the pruned {name} does not have")
            masks[f"{layer.layer}.weight"] = weight.detach() != 0
    return masks


def plan_recover(pruned_dir: Path, config: RecoverConfig, *, teacher_dir: Path | None = None) -> dict:
    """``recover --plan``: the memory plan (expected peak per phase, gradient checkpointing or not); writes nothing."""
    config.validate()
    pruned = PrunedFolder.open(pruned_dir)
    record = pruned.record
    teacher_dir = _teacher_dir(record, teacher_dir)
    name, teacher = check_inputs(pruned, teacher_dir, None, False)
    config, prompts = _resolved(config, record, teacher)
    base = current_rss()
    return plan_memory(teacher.load_pipeline(), name, config, len(prompts), _student_bytes(pruned, name),
                       _pipeline_bytes(pruned), _budget(config), base)


def _resolved(config: RecoverConfig, record: PruningRecord, teacher: PrunedFolder) -> tuple[RecoverConfig, list[str]]:
    """The settings left unset taken from the prune's record, and the prompts they select."""
    settings = record.settings
    config = replace(config, num_prompts=config.num_prompts or settings.num_prompts,
                     guidance=settings.guidance if config.guidance is None else config.guidance,
                     height=config.height or settings.height, width=config.width or settings.width)
    available = read_prompts(replace(settings, num_prompts=config.num_prompts), teacher.path)
    # more trajectories than the file has prompts: the prompts again, each with its own starting noise
    return config, [available[i % len(available)] for i in range(config.num_prompts)]


def _teacher_dir(record: PruningRecord | None, given: Path | None) -> Path:
    """``--teacher``, else the dense source the record names (a folder without a record is refused later)."""
    return Path(given) if given is not None else Path(record.source) if record else Path()


def _budget(config: RecoverConfig) -> int:
    return int(config.max_memory_gib * GIB) if config.max_memory_gib else available_memory(torch.device("cpu"))


def recover(pruned_dir: Path, out_dir: Path, config: RecoverConfig, *, teacher_dir: Path | None = None,
            resume: bool = False, overwrite: bool = False) -> PruningRecord:
    """Distil ``pruned_dir``'s denoiser from its teacher into ``out_dir`` (published whole at the end)."""
    started = time.time()
    config.validate()
    pruned = PrunedFolder.open(pruned_dir)
    out_dir = Path(out_dir)
    record = pruned.record
    teacher_dir = _teacher_dir(record, teacher_dir)
    name, teacher = check_inputs(pruned, teacher_dir, out_dir, overwrite)
    config, prompts = _resolved(config, record, teacher)
    fingerprint = hashlib.sha256(json.dumps([folder_fingerprint(pruned.path), folder_fingerprint(teacher.path),
                                             config.to_json(), prompts]).encode()).hexdigest()
    with OutputLock(out_dir):
        return _recover_locked(pruned, teacher, name, out_dir, config, prompts, fingerprint, resume, started)


def _recover_locked(pruned: PrunedFolder, teacher: PrunedFolder, name: str, out_dir: Path, config: RecoverConfig,
                    prompts: list[str], fingerprint: str, resume: bool, started: float) -> PruningRecord:
    torch.manual_seed(config.seed)
    checkpoint = RecoverCheckpoint(out_dir)
    if not resume:
        checkpoint.discard()
    t0 = time.time()
    base = current_rss()
    teacher_pipe = teacher.load_pipeline()
    student_bytes = _student_bytes(pruned, name)
    budget = _budget(config)
    plan = plan_memory(teacher_pipe, name, config, len(prompts), student_bytes, _pipeline_bytes(pruned), budget,
                       base)
    if plan["expected_peak_bytes"] > budget:
        raise UsageError(f"recover needs about {plan['expected_peak_bytes'] / GIB:.1f} GiB even with gradient "
                         f"checkpointing, over the {budget / GIB:.2f} GiB budget: lower --batch-size, "
                         "--num-prompts or the size")
    log.info("memory plan: expected peak %.2f GiB of %.2f (gradient checkpointing %s)",
             plan["expected_peak_bytes"] / GIB, budget / GIB, "on" if plan["gradient_checkpointing"] else "off")
    calls = checkpoint.load_recording(fingerprint) if resume else None
    if calls is None:
        calls = record_teacher(teacher_pipe, teacher_pipe.components[name], prompts, config)
        log.info("recorded %d teacher calls (%d rows, %.1f MiB)", len(calls.targets), calls.rows,
                 calls.nbytes() / 2**20)
        checkpoint.save_recording(calls, fingerprint)
    else:
        log.info("--resume: %d teacher calls read from %s", len(calls.targets), checkpoint.folder)
    del teacher_pipe
    gc.collect()
    record_s = time.time() - t0

    student_pipe = pruned.load_pipeline()
    student = student_pipe.components[name]
    del student_pipe
    gc.collect()
    masks = masks_of(pruned.record, name, student)
    if plan["gradient_checkpointing"]:
        student.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    progress = checkpoint.load_state(student, optimizer, fingerprint) if resume else None
    if progress is not None:
        log.info("--resume: continuing at step %d of %d", progress["step"], config.steps)
    progress = progress or {"fingerprint": fingerprint, "step": 0, "loss_curve": [], "train_s": 0.0}
    train_s = _train(student, masks, calls, config, optimizer, progress, checkpoint)

    recovery = RecoveryRecord(
        teacher=str(teacher.path), teacher_fingerprint=teacher.model_fingerprint, component=name,
        settings=config.to_json(), prompts=len(prompts), rows=calls.rows, masked_layers=len(masks),
        gradient_checkpointing=bool(plan["gradient_checkpointing"]), loss_curve=progress["loss_curve"],
        seconds_per_step=train_s / max(config.steps, 1),
        timings={"record_s": record_s, "train_s": train_s, "total_s": time.time() - started},
        memory_plan=plan, peak_rss_mb=peak_rss() / 2**20)
    record = replace(pruned.record, recovery=recovery)
    _publish(pruned, out_dir, name, student, record)
    checkpoint.discard()
    return record


def _student_bytes(pruned: PrunedFolder, name: str) -> int:
    """The pruned denoiser's parameter bytes, from its safetensors headers (nothing loaded)."""
    return sum(_safetensors_bytes(f) for f in (pruned.path / name).glob("*.safetensors"))


def _pipeline_bytes(folder: PrunedFolder) -> int:
    return sum(_safetensors_bytes(f) for f in folder.path.glob("*/*.safetensors"))


def _safetensors_bytes(file: Path) -> int:
    with open(file, "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def _train(student: nn.Module, masks: dict[str, torch.Tensor], calls: TeacherCalls, config: RecoverConfig,
           optimizer: torch.optim.Optimizer, progress: dict, checkpoint: RecoverCheckpoint) -> float:
    """The distillation loop from ``progress['step']``; returns the seconds spent training (this run and before)."""
    params = dict(student.named_parameters())
    index = calls.index()
    student.train()
    start = progress["step"]
    log_every = max(1, config.steps // 50)
    window: list[float] = []
    bar = tqdm(total=config.steps, initial=start, desc="recover", unit="step", mininterval=2)
    t0 = time.time()
    try:
        for step in range(start, config.steps):
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            picks = index[torch.randint(0, len(index), (config.batch_size,), generator=generator)]
            args, kwargs, target = calls.batch(picks)
            out = student(*args, **kwargs)
            out = out[0] if isinstance(out, (tuple, list)) else out.sample
            loss = torch.nn.functional.mse_loss(out.float(), target.float())
            if not torch.isfinite(loss):
                raise UsageError(f"the loss became {loss.item()} at step {step}: lower --lr (now {config.lr:g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for key, mask in masks.items():
                params[key].grad.mul_(mask)
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step)
            optimizer.step()
            with torch.no_grad():
                for key, mask in masks.items():
                    params[key].mul_(mask)
            window.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3g}", refresh=False)
            done = step + 1
            if done % log_every == 0 or done == config.steps:
                progress["loss_curve"].append([done, sum(window) / len(window)])
                window.clear()
            if done % config.checkpoint_every == 0 and done < config.steps:
                progress.update(step=done, train_s=progress["train_s"] + time.time() - t0)
                t0 = time.time()
                checkpoint.save_state(student, optimizer, progress)
                fault_point("recover-checkpoint")
    finally:
        bar.close()
    student.eval()
    if hasattr(student, "disable_gradient_checkpointing") and student.is_gradient_checkpointing:
        student.disable_gradient_checkpointing()
    progress.update(step=config.steps, train_s=progress["train_s"] + time.time() - t0)
    return progress["train_s"]


def _publish(pruned: PrunedFolder, out_dir: Path, name: str, student: nn.Module, record: PruningRecord) -> None:
    staging = staging_path(out_dir)
    try:
        copy_model_files(pruned.path, staging, skip={name, RECORD_FILE})
        write_pruned_folder(staging, {name: student}, record, {})
        fault_point("before-publish")
        replace_dir(staging, out_dir)
    except BaseException:
        discard_staging(out_dir)
        raise
