"""The one training loop, for pretraining and fine-tuning, from one CPU process to many GPUs.

A `Task` supplies what differs (data, model, loss, what happens after an epoch); `Run` does the rest:
process group, wrapping, AdamW with the per-iteration schedule, gradient accumulation, mixed
precision, skipping non-finite steps, logging, checkpoints and exact resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..checkpoint import training as checkpoints
from ..config import TrainConfig
from ..data.datasets import derive_seed, require_readable
from ..errors import UsageError
from ..hardware import auto_precision
from ..models import kernels
from ..viz import save_curves
from .builders import train_loader
from .distributed import DistEnv, all_reduce_sum, barrier, broadcast_object, gather_objects, setup, teardown
from .logging import METRICS, Progress, RunLogger, format_duration, read_metrics
from .machine import choose_split, decide_kernels, loss_step, measure_rates
from .optim import LRSchedule, build_optimizer, group_table, scale_lrs
from .parallelize import autocast, grad_scaler, gradient_sync, parallelize, resolve_precision

SKIPPED_FILES = "skipped_files.txt"
CONFIG_FILE = "config.yaml"
LOSS_CURVE = "loss_curve.png"
RUN_FILES = (CONFIG_FILE, METRICS, SKIPPED_FILES, LOSS_CURVE, "tensorboard", "reconstructions")
"""What a run writes in its folder besides checkpoints: all that --overwrite removes."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss."""


class RunInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run after a step and a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum  # the shell's convention for a death by that signal


@contextlib.contextmanager
def stop_requests(run: Run) -> Iterator[None]:
    """While active, SIGINT/SIGTERM ask the run to stop after its current step (a second one stops at
    once); the handlers of the caller come back afterwards. Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request(signum, frame):
        if run.stop_signal is not None:
            raise KeyboardInterrupt
        run.stop_signal = signum
        run.log.print(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                      "(send it again to stop at once)")

    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Task(Protocol):
    """What differs between pretraining and fine-tuning."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, log: RunLogger) -> None: ...

    def build_model(self, resuming: bool) -> nn.Module:
        """The pure model (pretrained weights loaded unless the run resumes)."""

    def train_dataset(self, model: nn.Module) -> Dataset: ...

    def collate(self, model: nn.Module) -> Callable: ...

    def loss(self, model: nn.Module, images: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """Scalar loss of a batch; `second` is the masks (pretraining) or the targets (fine-tuning)."""

    def end_epoch(self, run: Run, epoch: int) -> dict[str, float]:
        """Evaluation or pictures after an epoch; metrics to record."""

    def finish(self, run: Run, seconds: float) -> dict[str, float]:
        """Final pictures and summary after `seconds` of training; the run's headline metrics."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class RunResult:
    """What a finished run produced."""

    run_dir: Path
    checkpoint: Path | None
    """The last checkpoint written."""
    epochs: int
    steps: int
    seconds: float
    images_per_second: float
    """Images per second of all processes together, over this session's training time (evaluation and
    checkpoints left out)."""
    skipped_steps: int
    """Optimizer steps skipped for a non-finite loss."""
    skipped_files: list[str]
    """Images that could not be decoded (also in RUN_DIR/skipped_files.txt)."""
    metrics: dict[str, float]
    precision: str
    """What the run computed in: runtime.precision with 'auto' resolved for its device."""


@dataclass
class Position:
    """Where a run is: the epoch, its next micro-batch and the optimizer steps done so far."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


def default_run_dir(cfg: TrainConfig) -> str:
    name = cfg.preset or cfg.model.name
    return str(Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}")


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def run_contents(run_dir: Path) -> list[Path]:
    """What runs wrote in `run_dir`: checkpoints (complete, temporary or being deleted) and RUN_FILES."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir()
                  if p.name in RUN_FILES or checkpoints.NAME.match(p.name) or checkpoints.TEMPORARY.match(p.name))


def free_folder(run_dir: Path) -> Path:
    """RUN_DIR-2, RUN_DIR-3, ...: the first that does not exist."""
    return next(p for n in range(2, 10**6) if not (p := run_dir.with_name(f"{run_dir.name}-{n}")).exists())


def check_new_run_folder(run_dir: Path, overwrite: bool) -> None:
    """A new run refuses a folder that holds another run's config, metrics or checkpoints (continuing
    into it would mix the two), unless told to overwrite it."""
    held = [p.name for p in run_contents(run_dir) if p.name in (CONFIG_FILE, METRICS) or
            checkpoints.NAME.match(p.name)]
    if held and not overwrite:
        raise UsageError(f"{run_dir} already holds a run ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): "
                         f"continue it with --resume auto --out {run_dir}, start it over with --overwrite, "
                         f"or pick a free folder such as --out {free_folder(run_dir)}")


def clear_run(run_dir: Path) -> None:
    """Removes an earlier run's files (RUN_FILES and checkpoints, nothing else), the checkpoints first
    so that an interrupted clearing leaves a folder that still reads as holding a run."""
    for path in sorted(run_contents(run_dir), key=lambda p: p.name in RUN_FILES):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def train(cfg: TrainConfig, task_cls: type[Task], overwrite: bool = False) -> RunResult:
    """Runs (or resumes) a training run in this process, joining torchrun's process group if any.
    `overwrite` lets a new run replace the run in its folder; otherwise such a folder is refused."""
    env = setup(cfg.runtime.device)
    run = None
    try:
        run = Run(cfg, env, task_cls, overwrite)
        try:
            with kernels.using(run.kernels):
                return run.fit()
        finally:
            run.log.close()
    except BaseException:
        if run is not None and env.is_main and run.created_dir:
            remove_unused_folder(run.run_dir)
        raise
    finally:
        teardown(env)


def remove_unused_folder(run_dir: Path) -> None:
    """Removes the folder of a run that failed before writing more than its config."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {CONFIG_FILE}:
        shutil.rmtree(run_dir)


class Run:
    """The state of one training run in one process."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, task_cls: type[Task], overwrite: bool = False):
        run_dir = Path(broadcast_object(cfg.out_dir or default_run_dir(cfg), env))  # one timestamp for all
        self.cfg = cfg = dataclasses.replace(cfg, out_dir=str(run_dir))
        self.env, self.run_dir, self.created_dir = env, run_dir, False
        self.log = RunLogger(run_dir, env.is_main, cfg.runtime.tensorboard)
        if overwrite and cfg.checkpoint.resume:
            raise UsageError("--overwrite starts a new run and --resume continues one: pass one of them")
        resume = checkpoints.resume_path(cfg.checkpoint.resume, run_dir)
        if cfg.checkpoint.resume == "auto" and resume is None:
            self.log.print(f"no checkpoint in {run_dir} yet: starting from scratch")
        elif resume is None:
            check_new_run_folder(run_dir, overwrite)

        seed_all(cfg.runtime.seed)  # the same initial weights on every rank and for every world size
        self.task = task_cls(cfg, env, self.log)  # reads the data: a wrong path fails before anything is written
        self.model = self.task.build_model(resuming=resume is not None)
        self.dataset = self.task.train_dataset(self.model)
        self.precision = resolve_precision(cfg.runtime.precision, env.device)
        collate = self.task.collate(self.model)
        require_readable(self.dataset.source, cfg.data.path)  # before the core split's measurement reads it
        self.split = choose_split(env, cfg.runtime.threads, cfg.data.num_workers,
                                  lambda counts: self.measure_rates(collate, counts))
        self.kernels = decide_kernels(cfg.runtime, env)  # at the run's thread count
        # config.yaml and the checkpoints record the kernels taken
        self.cfg = cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(
            cfg.runtime, gemm_route=self.kernels.gemm_route, recompute=self.kernels.recompute))
        workers = cfg.data.num_workers if self.split is None else self.split.workers
        self.loader, self.sampler = train_loader(self.dataset, collate, cfg, env, workers)
        self.wrapped = parallelize(self.model, env, cfg.runtime.parallel, cfg.runtime.compile, self.precision)
        # by default sharded exactly when FSDP2 shards the model: gathering its full state is what FSDP avoids
        self.sharded = cfg.checkpoint.sharded if cfg.checkpoint.sharded is not None else \
            cfg.runtime.parallel == "fsdp" and env.distributed
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scaler = grad_scaler(self.precision, env.device, sharded=cfg.runtime.parallel == "fsdp")
        self.accumulation = cfg.optim.accumulation_steps
        self.steps_per_epoch = self.sampler.batches // self.accumulation
        self.scaled = scale_lrs(cfg.optim, cfg.data.batch_size, env.world_size)
        self.schedule = LRSchedule.from_config(self.scaled, cfg.schedule, self.steps_per_epoch)
        self.pos = Position()
        self.bad_steps = self.bad_in_a_row = 0
        self.stop_signal: int | None = None
        self.skipped_files: set[str] = set()
        self.last_checkpoint: Path | None = None
        self.loss_sum = torch.zeros(2, device=env.device)  # finite step losses and their count since the last line
        self.last_loss = float("nan")
        self.compile_reported = not cfg.runtime.compile  # a compiled run says once what compiling cost
        # nothing is written (or removed) before here: a run that cannot start leaves the folder as it was
        if env.is_main:
            if overwrite:
                clear_run(run_dir)
            self.created_dir = not run_dir.exists()
            run_dir.mkdir(parents=True, exist_ok=True)
        barrier(env)
        if resume is not None:
            self.load(resume)
        else:  # dropout, drop path and mixup differ between ranks, as in the official code
            seed_all(derive_seed(cfg.runtime.seed, env.rank, 1))

    def measure_rates(self, collate: Callable, thread_counts: list[int]) -> tuple[float, dict[int, float]]:
        """(images/s loaded by one process, {threads: images/s of a training step}), with the run's
        kernels and precision; the weights and random streams left as they were."""
        cfg, device = self.cfg, self.env.device

        def loss(batch: tuple) -> torch.Tensor:
            with autocast(self.precision, device):
                return self.task.loss(self.model, batch[0].to(device), batch[1].to(device))

        self.model.train()
        with kernels.using(kernels.resolve(cfg.runtime.gemm_route, cfg.runtime.recompute)):
            return measure_rates(self.dataset, collate, cfg.data.batch_size,
                                 loss_step(loss, list(self.model.parameters())), thread_counts)

    # -- reporting ------------------------------------------------------------------------------------

    def describe(self) -> None:
        cfg, env, s = self.cfg, self.env, self.scaled
        params = sum(p.numel() for p in self.model.parameters())
        procs = f"{env.world_size} processes ({cfg.runtime.parallel})" if env.distributed else "1 process"
        self.log.print(f"simmim {cfg.task}: {cfg.model.name} ({params:,} params) on {len(self.dataset):,} images "
                       f"from {cfg.data.path} -> {self.run_dir}")
        threads = f" ({self.split.counts()})" if self.split else ""
        why = f" ({auto_precision(env.device)[1]})" if cfg.runtime.precision == "auto" else ""
        self.log.print(f"{procs} on {env.device.type}{threads}, {self.precision}{why}; effective batch "
                       f"{s.effective_batch} = {cfg.data.batch_size} per process x {env.world_size} x "
                       f"{self.accumulation} accumulation step{'s' if self.accumulation > 1 else ''}")
        sched = (f"cosine to {s.min_lr:.3g}" if cfg.schedule.name == "cosine" else
                 f"x{cfg.schedule.gamma} at epochs {list(cfg.schedule.milestones)}")
        self.log.print(f"lr {s.lr:.4g} (base {cfg.optim.lr:g} x {s.effective_batch}/{cfg.optim.lr_batch}), warmup "
                       f"from {s.warmup_lr:.3g} over {self.schedule.warmup_steps} steps, {sched}; "
                       f"{self.steps_per_epoch} steps/epoch x {cfg.schedule.epochs} epochs")
        if self.split:
            self.log.print(f"cores: {self.split.describe()}")
        self.log.print(f"kernels: {self.kernels.describe()}")
        if cfg.optim.layer_decay != 1.0:
            self.log.print(f"layer-wise lr decay {cfg.optim.layer_decay}:\n{group_table(self.optimizer)}")

    def report_progress(self, epoch: int, progress: Progress, lr: float, grad_norm: torch.Tensor) -> None:
        """Progress line and metrics record: the only place the loss is read back from the device."""
        loss_sum, count = all_reduce_sum(self.loss_sum.clone(), self.env).tolist()
        self.loss_sum.zero_()
        self.last_loss = loss_sum / count if count else float("nan")
        rate, eta = progress.tick(self.pos.step)
        in_epoch = self.pos.batch // self.accumulation
        memory = (f"  mem {torch.cuda.max_memory_allocated(self.env.device) / 2**30:.1f} GiB"
                  if self.env.device.type == "cuda" else "")
        self.log.print(f"epoch {epoch + 1}/{self.cfg.schedule.epochs}  step {in_epoch}/{self.steps_per_epoch}  "
                       f"loss {self.last_loss:.4f}  lr {lr:.3e}  {rate:.1f} img/s  eta {format_duration(eta)}{memory}")
        self.log.record("train", self.pos.step, epoch=epoch + 1, loss=self.last_loss, lr=lr,
                        grad_norm=float(grad_norm), img_per_s=rate)

    # -- training -------------------------------------------------------------------------------------

    def fit(self) -> RunResult:
        with stop_requests(self):
            return self._fit()

    def _fit(self) -> RunResult:
        cfg = self.cfg
        self.describe()
        if self.env.is_main:
            cfg.save(self.run_dir / CONFIG_FILE)
        total = cfg.schedule.epochs * self.steps_per_epoch
        progress = Progress(total, self.scaled.effective_batch, self.pos.step)
        start = time.perf_counter()
        if self.pos.epoch >= cfg.schedule.epochs:
            self.log.print(f"the run is complete ({self.pos.epoch} of {cfg.schedule.epochs} epochs): nothing to do; "
                           "--epochs N continues it for more")
        for epoch in range(self.pos.epoch, cfg.schedule.epochs):
            self.sampler.set_epoch(epoch, self.pos.batch)
            self.train_epoch(epoch, progress)
            with progress.paused():
                metrics = self.task.end_epoch(self, epoch)
                self.pos = Position(epoch + 1, 0, self.pos.step)
                if metrics:
                    self.log.record("eval", self.pos.step, epoch=epoch + 1, **metrics)
                every = cfg.checkpoint.every_steps
                if (epoch + 1) % cfg.checkpoint.every_epochs == 0 or epoch + 1 == cfg.schedule.epochs or (
                        every and self.pos.step % every == 0):
                    self.save()
                self.write_skipped_files()
        seconds = time.perf_counter() - start
        metrics = self.task.finish(self, seconds)
        self.log.record("summary", self.pos.step, seconds=round(seconds, 3), skipped_steps=self.bad_steps, **metrics)
        final = self.last_checkpoint or checkpoints.checkpoint_path(self.run_dir, self.pos.step)
        return RunResult(self.run_dir, final if final.exists() else None, cfg.schedule.epochs, self.pos.step,
                         seconds, progress.images_per_second(self.pos.step), self.bad_steps,
                         sorted(self.skipped_files), metrics, self.precision)

    def train_epoch(self, epoch: int, progress: Progress) -> None:
        device, accumulation = self.env.device, self.accumulation
        step_loss = torch.zeros((), device=device)
        self.wrapped.train()
        started = time.perf_counter()
        for micro, (images, second, skipped) in enumerate(self.loader, start=self.pos.batch):
            self.skipped_files.update(skipped)
            images, second = images.to(device, non_blocking=True), second.to(device, non_blocking=True)
            last_micro = (micro + 1) % accumulation == 0
            with gradient_sync(self.wrapped, enabled=last_micro):
                with autocast(self.precision, device):
                    loss = self.task.loss(self.wrapped, images, second)
                scaled = loss / accumulation
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            step_loss += loss.detach().float()
            if not last_micro:
                continue
            lr, grad_norm, stop = self.optimizer_step(step_loss / accumulation, epoch)
            if not self.compile_reported:  # torch.compile traces and compiles in the first forward and backward
                self.compile_reported = True
                seconds = time.perf_counter() - started
                self.log.print(f"torch.compile: the first step, which compiles, took {seconds:.1f} s")
            step_loss = torch.zeros((), device=device)
            self.pos = Position(epoch, micro + 1, self.pos.step + 1)
            end_of_epoch = micro + 1 == self.sampler.batches
            if self.pos.step % self.cfg.runtime.log_every == 0 or end_of_epoch or stop:
                self.report_progress(epoch, progress, lr, grad_norm)
            if stop:
                self.stop(epoch)
            every = self.cfg.checkpoint.every_steps
            if every and self.pos.step % every == 0 and not end_of_epoch:  # the epoch's end saves after evaluating
                with progress.paused():
                    self.save()

    def optimizer_step(self, loss: torch.Tensor, epoch: int) -> tuple[float, torch.Tensor, bool]:
        """Clips and applies the accumulated gradients, unless the loss (on any rank) or, without a
        loss scaler, the gradient norm is not finite: then the step is skipped and counted. Also
        returns whether any rank was asked to stop (agreed in the same reduction, so all stop together)."""
        lr = self.schedule.apply(self.optimizer, self.pos.step)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.optim.clip_grad
        norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip else \
            torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a DTensor
        # with a scaler, inf/nan gradients are its business (fp16 overflow)
        bad_norm = (~torch.isfinite(norm)).float() if self.scaler is None else torch.zeros((), device=norm.device)
        stop = torch.tensor(float(self.stop_signal is not None), device=loss.device)
        flags = all_reduce_sum(torch.stack([(~torch.isfinite(loss)).float(), bad_norm.to(loss.device), stop]), self.env)
        bad_loss, bad_norm, stop = (flags > 0).tolist()  # the one host-device sync per step
        if bad_loss or bad_norm:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.update()
            self.skip_step(epoch)
            return lr, norm, stop
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_in_a_row = 0
        self.loss_sum += torch.stack([loss.detach(), torch.ones_like(loss)])
        return lr, norm, stop

    def stop(self, epoch: int) -> None:
        """Ends an interrupted run: a checkpoint of this very step, then RunInterrupted."""
        self.save()
        self.write_skipped_files()
        signum = self.stop_signal or signal.SIGTERM  # another rank may have been the one signalled
        where = f"epoch {epoch + 1}, step {self.pos.step}"
        raise RunInterrupted(f"stopped by {signal.Signals(signum).name} at {where}; checkpoint "
                             f"{self.last_checkpoint}; continue with --resume auto --out {self.run_dir}", signum)

    def skip_step(self, epoch: int) -> None:
        self.bad_steps += 1
        self.bad_in_a_row += 1
        step = self.pos.step + 1
        self.log.print(f"epoch {epoch + 1} step {step}: non-finite loss, update skipped "
                       f"({self.bad_in_a_row} in a row, {self.bad_steps} in all)")
        self.log.record("skip", step, epoch=epoch + 1, in_a_row=self.bad_in_a_row, total=self.bad_steps)
        if self.bad_in_a_row >= self.cfg.runtime.max_bad_steps:
            last = checkpoints.list_checkpoints(self.run_dir)
            kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"stopped after {self.bad_in_a_row} consecutive steps with a non-finite loss (epoch {epoch + 1}, "
                f"step {step}; runtime.max_bad_steps={self.cfg.runtime.max_bad_steps}); {kept}")

    # -- checkpoints ----------------------------------------------------------------------------------

    def save(self) -> None:
        """Writes a checkpoint of the current position (collective: every rank takes part); not while
        steps are being skipped, so the newest checkpoint is always the last good one."""
        if self.bad_in_a_row:
            self.log.print(f"step {self.pos.step}: no checkpoint while the loss is not finite")
            return
        rng = gather_objects(checkpoints.capture_rng(), self.env)
        skipped = sorted(set().union(*gather_objects(self.skipped_files, self.env)))
        state = dict(schedule=dataclasses.asdict(self.schedule),
                     scaler=self.scaler.state_dict() if self.scaler else None, epoch=self.pos.epoch,
                     batch=self.pos.batch, step=self.pos.step, rng=rng,
                     world_size=self.env.world_size, bad_steps=self.bad_steps, skipped_files=skipped,
                     last_loss=self.last_loss,
                     task=self.task.state_dict(), config=self.cfg.to_dict())
        self.last_checkpoint = checkpoints.write(self.run_dir, self.pos.step, self.model, self.optimizer, state,
                                                 sharded=self.sharded, keep=self.cfg.checkpoint.keep,
                                                 is_main=self.env.is_main)
        if self.env.is_main:
            self.write_loss_curve()
        barrier(self.env)

    def load(self, path: Path) -> None:
        """Continues from a checkpoint of either kind written at any world size: weights, optimizer,
        scaler, position (kept as samples seen, so that no sample is repeated or skipped), counters,
        and the RNG streams when the world size is the same."""
        state, batch = checkpoints.resume(path, self.model, self.optimizer, self.cfg.to_dict(), self.env.world_size)
        epochs = state["config"]["schedule"]["epochs"]
        if epochs != self.cfg.schedule.epochs:
            self.log.print(f"schedule.epochs {epochs} -> {self.cfg.schedule.epochs}: the lr schedule is "
                           f"recomputed for the new length from step {state['step']} on")
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.pos = Position(state["epoch"], batch, state["step"])
        self.bad_steps, self.skipped_files = state["bad_steps"], set(state["skipped_files"])
        self.last_loss = state.get("last_loss", float("nan"))
        self.task.load_state_dict(state["task"])
        self.last_checkpoint = Path(path)
        if len(state["rng"]) == self.env.world_size:
            checkpoints.restore_rng(state["rng"][self.env.rank])
        else:
            self.log.print(f"{path} was written by {len(state['rng'])} processes, this run has "
                           f"{self.env.world_size}: random streams start afresh")
            seed_all(derive_seed(self.cfg.runtime.seed, self.env.rank, self.pos.step))
        self.log.print(f"resumed from {path} at epoch {self.pos.epoch + 1}, step {self.pos.step}")

    def write_loss_curve(self) -> None:
        """RUN_DIR/loss_curve.png: the training loss of every progress record so far, over optimizer steps
        (drawn at every checkpoint, so a stopped run has the curve of its last one)."""
        records = read_metrics(self.run_dir, "train")
        if records:
            save_curves({"train loss": ([r["step"] for r in records], [r["loss"] for r in records])},
                        self.run_dir / LOSS_CURVE, xlabel="optimizer step",
                        title=f"{self.cfg.task}: {self.cfg.model.name}")

    def write_skipped_files(self) -> None:
        """RUN_DIR/skipped_files.txt lists the images that could not be decoded (all ranks)."""
        skipped = sorted(set().union(*gather_objects(self.skipped_files, self.env)))
        self.skipped_files = set(skipped)
        if skipped and self.env.is_main:
            (self.run_dir / SKIPPED_FILES).write_text("".join(f"{p}\n" for p in skipped))
            self.log.print(f"{len(skipped)} unreadable images skipped so far (listed in {SKIPPED_FILES})")
