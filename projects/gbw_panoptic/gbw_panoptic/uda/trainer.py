"""The UDA trainer: Detectron2's ``TrainerBase`` with a UDA ``run_step`` and DefaultTrainer-like builders.

Per iteration: next ``(source_batch, target_batch)``; the method's ``before_step`` (EMA update); the
method's forwards and backwards (:mod:`.method`); optional gradient clipping; optimizer steps through
the gradient scaler (AMP on CUDA). Hooks: iteration timer, LR schedule, checkpoints (with the RNG states
of every process), periodic evaluation on ``DATASETS.TEST``, and Detectron2's writers (console with ETA,
``metrics.json``, TensorBoard). The methods hand over their own scalars (``dacs/...``, ...) and the GBW
class weights of their passes (``gbw/source/...``, ``gbw/mixed/...``), which stay on the device until the
writers write: only then are they read back and put into the event storage.

SIGTERM and SIGINT during :meth:`UDATrainer.train` end the current iteration (or abandon it, when its
data can no longer be loaded), write a checkpoint of the last finished iteration and raise
:class:`TrainingInterrupted`; ``--resume`` continues from it exactly. A second signal abandons at once.
"""
import logging
import os
import signal
import time
import weakref
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from detectron2.config import CfgNode
from detectron2.engine import TrainerBase, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, EventWriter, get_event_storage

from ..data import UDATrainLoader, build_test_loader, build_uda_train_loader
from ..utils.d2_compat import write_loss_metrics
from .checkpoint import (
    AtomicCheckpointer,
    PeriodicCheckpointerWithRNG,
    get_rng_state,
    preserved_rng_state,
    set_rng_state,
)
from .method import UDAMethod, build_uda_method
from .optim import CLIP_TYPES, build_lr_scheduler, build_optimizer
from .runner import StudentRunner, needs_unused_parameter_search
from .signals import StopSignals, TrainingInterrupted

__all__ = ["UDATrainer"]


def _broadcast_from_main(module: nn.Module) -> None:
    """Copy the parameters and buffers of the main process's ``module`` into every other process's (a
    no-op in a single process). DDP does this for the student alone, when it wraps it: too late for the
    networks a UDA method builds from the student or from each process's random state."""
    if comm.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)


logger = logging.getLogger(__name__)


class _StepAbandoned(BaseException):
    """The data of an iteration could not be loaded after a stop signal (e.g. a loader worker was killed
    too). A ``BaseException``, so that the training loop does not log it as a failure."""


class _ConsolePrinter(CommonMetricPrinter):
    """Detectron2's console printer (losses, times, ETA), printing each iteration at most once.

    ``PeriodicWriter`` writes once more when training ends; Detectron2's printer would repeat the last
    line and, when training stopped before the iteration timer's warm-up (a stop signal at iteration
    1), divide by zero in its ETA estimate.
    """

    def __init__(self, max_iter: int):
        super().__init__(max_iter)
        self._printed_iter: Optional[int] = None

    def write(self) -> None:
        iteration = get_event_storage().iter
        if iteration != self._printed_iter:
            super().write()
            self._printed_iter = iteration


class _GBWWeightWriter(EventWriter):
    """Puts the GBW class weights of the last step into the event storage, read back from the device in
    one copy. First among the writers of the ``PeriodicWriter``, it runs only at the iterations whose
    metrics are written, so that the weights reach ``metrics.json`` and TensorBoard with them: a readback
    at every step would make the host wait for the device.

    Attributes:
        weights: ``{"gbw/<pass>/<loss>/<class name>": 0-dim tensor}`` of the last step
            (:attr:`StepOutput.gbw_weights <gbw_panoptic.uda.method.StepOutput.gbw_weights>`), put at the
            storage's iteration (the step's) and then dropped, so that the ``PeriodicWriter``'s last write
            after training, at the iteration after the last step, puts them no second time.
    """

    def __init__(self):
        self.weights: Dict[str, torch.Tensor] = {}

    def write(self) -> None:
        if self.weights:
            values = torch.stack(list(self.weights.values())).tolist()
            get_event_storage().put_scalars(smoothing_hint=False, **dict(zip(self.weights, values)))
            self.weights = {}


class _StopOnSignal(hooks.HookBase):
    """After an iteration during which a stop signal arrived (on any process): checkpoint and stop.

    Registered last, after the periodic checkpointer, so an iteration it has just saved is not saved twice.
    """

    def after_step(self) -> None:
        trainer = self.trainer
        received = trainer.stop_signals.received
        if comm.get_world_size() > 1:  # every process stops after the same iteration
            received = max(comm.all_gather(received))
        if received and trainer.iter < trainer.max_iter - 1:
            saved = (trainer.iter + 1) % trainer.cfg.SOLVER.CHECKPOINT_PERIOD == 0
            trainer.interrupt(received, trainer.iter, saved)


def _clip_gradients(parameters: List[nn.Parameter], clip_cfg: CfgNode) -> None:
    """Clip in place by ``SOLVER.CLIP_GRADIENTS`` (``CLIP_TYPE`` "value" or "norm")."""
    if clip_cfg.CLIP_TYPE == "value":
        torch.nn.utils.clip_grad_value_(parameters, clip_cfg.CLIP_VALUE)
    elif clip_cfg.CLIP_TYPE == "norm":
        torch.nn.utils.clip_grad_norm_(parameters, clip_cfg.CLIP_VALUE, norm_type=clip_cfg.NORM_TYPE)
    else:
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE={clip_cfg.CLIP_TYPE!r}; expected one of {CLIP_TYPES}")


def _rates(optimizer: torch.optim.Optimizer) -> List[Tuple[float, float]]:
    """``(base learning rate, weight decay)`` of each parameter group (``initial_lr``: the schedule's base)."""
    return [(group["initial_lr"], group["weight_decay"]) for group in optimizer.param_groups]


def _restore_rates(
    name: str, optimizer: torch.optim.Optimizer, scheduler, values: List[Tuple[float, float]]
) -> List[str]:
    """Put the config's ``values`` (:func:`_rates`) back into a just-loaded ``optimizer`` and its
    ``scheduler``; the current learning rate keeps its place in the schedule. Returns what changed."""
    changes = []
    scheduler.base_lrs = list(scheduler.base_lrs)  # a copy: a loaded state dict may share the list
    for index, (group, (base_lr, weight_decay)) in enumerate(zip(optimizer.param_groups, values)):
        label = f"{name} group {group.get('name', index)}"
        if group["initial_lr"] != base_lr:
            changes.append(f"{label} base lr {group['initial_lr']:g} (checkpoint) -> {base_lr:g} (config)")
            group["lr"] = group["lr"] * base_lr / group["initial_lr"] if group["initial_lr"] else base_lr
            group["initial_lr"] = base_lr
            scheduler.base_lrs[index] = base_lr
        if group["weight_decay"] != weight_decay:
            changes.append(f"{label} weight decay {group['weight_decay']:g} (checkpoint) -> {weight_decay:g} (config)")
            group["weight_decay"] = weight_decay
    return changes


class UDATrainer(TrainerBase):
    """Trains the student of ``cfg`` with ``UDA.METHOD`` (source_only | dacs | advent | minent).

    Typical use (what ``tools/train_net.py`` does)::

        trainer = UDATrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()

    Attributes:
        model: the student (unwrapped; DDP, when used, wraps it inside :attr:`runner`).
        method: the :class:`UDAMethod` with its own networks (teacher, discriminator, ...).
        optimizer, scheduler: the student's AdamW and learning-rate schedule.
        checkpointer: writes ``OUTPUT_DIR/model_*.pth`` holding everything needed to resume.
    """

    def __init__(self, cfg: CfgNode):
        super().__init__()
        self.cfg = cfg
        model = self.build_model(cfg)
        if cfg.MODEL.WEIGHTS:
            # Initial weights go in before the teacher and the frozen feature-distance encoder copy them.
            AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        # Each process seeds its own initialisation (SEED + rank): every process starts from the main
        # one's student, and its teacher, discriminator and frozen encoder are built from that.
        _broadcast_from_main(model)
        self.model = model
        self.method = self.build_method(cfg, model)
        _broadcast_from_main(self.method)
        self.optimizer = self.build_optimizer(cfg, model)
        self.scheduler = self.build_lr_scheduler(cfg, self.optimizer)
        self.data_loader = self.build_train_loader(cfg, self.method.uses_target)

        self.amp = bool(cfg.SOLVER.AMP.ENABLED) and model.device.type == "cuda"
        if cfg.SOLVER.AMP.ENABLED and not self.amp:
            logger.warning("SOLVER.AMP.ENABLED is ignored on %s; mixed precision runs on CUDA only", model.device)
        self.grad_scaler = torch.amp.GradScaler(model.device.type, enabled=self.amp)
        self.runner = StudentRunner(
            model,
            amp=self.amp,
            grad_scaler=self.grad_scaler,
            find_unused_parameters=needs_unused_parameter_search(model, self.method.semantic_only_pass),
        )
        model.train()
        self.method.train()

        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.stop_signals = StopSignals()
        self.rng_states: List[dict] = []
        self._resume_rng_states: List[dict] = []
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self._gbw_weight_writer = _GBWWeightWriter()
        self.register_hooks(self.build_hooks())

    # ------------------------------------------------------------------ builders
    @classmethod
    def build_model(cls, cfg: CfgNode) -> nn.Module:
        """The meta-architecture of ``MODEL.META_ARCHITECTURE`` on ``MODEL.DEVICE``; with ``MODEL.SYNC_BN`` its
        batch norm layers normalise over the whole batch of all processes."""
        from .. import modeling  # noqa: F401  (registers the meta-architecture, backbones and heads)
        from ..modeling.batch_norm import convert_to_whole_batch_norm

        model = build_model(cfg)
        return convert_to_whole_batch_norm(model) if cfg.MODEL.SYNC_BN else model

    @classmethod
    def build_method(cls, cfg: CfgNode, model: nn.Module) -> UDAMethod:
        return build_uda_method(cfg, model)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg: CfgNode, optimizer: torch.optim.Optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode, uses_target: bool = True) -> UDATrainLoader:
        """Iterable of ``(source_batch, target_batch)``; target batches are empty lists when unused."""
        return build_uda_train_loader(cfg, uses_target)

    @classmethod
    def test(cls, cfg: CfgNode, model: nn.Module) -> "OrderedDict[str, dict]":
        """Evaluate ``model`` on every dataset of ``DATASETS.TEST`` with the project's evaluators.

        Results are printed (main process), written by the evaluators under
        ``OUTPUT_DIR/inference/<dataset>``, and returned as ``{dataset: {task: {metric: value}}}``.
        """
        from ..evaluation import build_evaluators

        results: "OrderedDict[str, dict]" = OrderedDict()
        for dataset_name in cfg.DATASETS.TEST:
            loader = build_test_loader(cfg, dataset_name)
            evaluator = build_evaluators(cfg, dataset_name, os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name))
            results[dataset_name] = inference_on_dataset(model, loader, evaluator)
            if comm.is_main_process():
                logger.info(f"Evaluation results for {dataset_name}:")
                print_csv_format(results[dataset_name])
        return results

    def build_writers(self) -> List[EventWriter]:
        """Console (with ETA), ``OUTPUT_DIR/metrics.json`` and TensorBoard writers, after the one that puts
        the GBW class weights into the event storage."""
        console, *files = default_writers(self.cfg.OUTPUT_DIR, self.max_iter)
        assert isinstance(console, CommonMetricPrinter), console
        return [self._gbw_weight_writer, _ConsolePrinter(self.max_iter), *files]

    def build_hooks(self) -> List[hooks.HookBase]:
        cfg = self.cfg

        def evaluate() -> "OrderedDict[str, dict]":
            # Evaluation must not shift any generator: a resumed run does not repeat it.
            with preserved_rng_state():
                self._last_eval_results = self.test(cfg, self.model)
            return self._last_eval_results

        ret: List[Optional[hooks.HookBase]] = [
            hooks.IterationTimer(),
            hooks.LRScheduler(self.optimizer, self.scheduler),
            PeriodicCheckpointerWithRNG(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD),
            hooks.EvalHook(cfg.TEST.EVAL_PERIOD, evaluate) if cfg.DATASETS.TEST else None,
            hooks.PeriodicWriter(self.build_writers(), period=cfg.UDA.LOG_PERIOD) if comm.is_main_process() else None,
            _StopOnSignal(),
        ]
        return [hook for hook in ret if hook is not None]

    # ------------------------------------------------------------------ training
    def resume_or_load(self, resume: bool = True) -> None:
        """With ``resume`` and a ``last_checkpoint`` in ``OUTPUT_DIR``, restore everything from it and
        continue after its iteration; otherwise start at iteration 0 (``MODEL.WEIGHTS`` is already
        loaded at construction)."""
        if resume and self.checkpointer.has_checkpoint():
            self.checkpointer.resume_or_load("", resume=True)
            self.start_iter = self.iter + 1

    def train(self) -> Optional["OrderedDict[str, dict]"]:
        """Run iterations ``start_iter .. SOLVER.MAX_ITER - 1``; returns the last evaluation results."""
        # The data of a step depend only on the streams' seeds and the step: a resumed run starts
        # its loaders where the interrupted one stopped, with what it would have drawn next.
        self.data_loader.seek(self.start_iter)
        self._data_loader_iter = iter(self.data_loader)
        if self._resume_rng_states:
            if len(self._resume_rng_states) == comm.get_world_size():
                set_rng_state(self._resume_rng_states[comm.get_rank()])
            else:
                logger.warning(
                    f"The checkpoint holds RNG states of {len(self._resume_rng_states)} processes, this run has "
                    f"{comm.get_world_size()}; random generators are not restored"
                )
        with self.stop_signals:
            try:
                super().train(self.start_iter, self.max_iter)
            except _StepAbandoned:
                last_iter = self.iter - 1
                saved = (last_iter + 1) % self.cfg.SOLVER.CHECKPOINT_PERIOD == 0
                self.interrupt(self.stop_signals.received, last_iter, saved)
            finally:
                # Stop the loader workers now, however training ended. Left alive until the interpreter
                # exits, they would be sent SIGTERM, which they ignore, and the exit would wait forever.
                self._data_loader_iter = None
        return getattr(self, "_last_eval_results", None)

    def interrupt(self, signum: int, last_iter: int, saved: bool) -> None:
        """Checkpoint the state after iteration ``last_iter`` (unless ``saved``: already on disk, or no
        iteration ran) and raise :class:`TrainingInterrupted`. Collective: every process calls it after the
        same iteration."""
        checkpoint = None
        if last_iter < self.start_iter:
            where = "the checkpoint it started from (no iteration ran)"
        elif saved:
            where = f"the checkpoint of iteration {last_iter} already written"
        else:
            self.iter = last_iter
            self.rng_states = comm.all_gather(get_rng_state())
            name = f"model_{last_iter:07d}"
            self.checkpointer.save(name, iteration=last_iter)
            # The file the main process writes (the others write nothing, and their last_checkpoint may not
            # name it yet).
            checkpoint = os.path.join(self.checkpointer.save_dir, f"{name}.pth")
            where = f"the checkpoint {checkpoint}"
        comm.synchronize()  # no process exits while the checkpoint is being written
        message = (
            f"{signal.Signals(signum).name}: training stopped after iteration {last_iter} of {self.max_iter}; "
            f"--resume with OUTPUT_DIR {self.cfg.OUTPUT_DIR} continues from {where}"
        )
        logger.error(message)
        raise TrainingInterrupted(message, signum, checkpoint)

    def run_step(self) -> None:
        assert self.model.training, "[UDATrainer] the student was switched to eval mode"
        # A step that fails leaves no weights: the final write must not log the last step's as its own.
        self._gbw_weight_writer.weights = {}
        start = time.perf_counter()
        try:
            source_batch, target_batch = next(self._data_loader_iter)
        except Exception as e:
            if self.stop_signals.received:
                raise _StepAbandoned() from e
            raise
        data_time = time.perf_counter() - start

        self.method.before_step(self.model, self.iter)
        extra_optimizers = list(self.method.optimizers().values())
        for optimizer in [self.optimizer] + extra_optimizers:
            optimizer.zero_grad(set_to_none=True)
        output = self.method.run_step(self.runner, source_batch, target_batch, self.iter)
        self._write_metrics(output.losses, output.metrics, data_time)
        self._gbw_weight_writer.weights = output.gbw_weights

        if self.cfg.SOLVER.CLIP_GRADIENTS.ENABLED:
            self.grad_scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            _clip_gradients(params, self.cfg.SOLVER.CLIP_GRADIENTS)
        for optimizer in [self.optimizer] + extra_optimizers:
            self.grad_scaler.step(optimizer)
        self.grad_scaler.update()
        for scheduler in self.method.schedulers().values():
            scheduler.step()

    def _write_metrics(self, losses: Dict[str, torch.Tensor], metrics: Dict[str, float], data_time: float) -> None:
        """Losses via Detectron2's ``SimpleTrainer.write_metrics`` (averaged over processes, ``total_loss``,
        error on non-finite values); other scalars averaged over processes."""
        write_loss_metrics(losses, data_time, self.iter)
        all_metrics = comm.gather(metrics)
        if comm.is_main_process() and metrics:
            get_event_storage().put_scalars(**{k: float(np.mean([m[k] for m in all_metrics])) for k in metrics})

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        ret = super().state_dict()
        ret["optimizer"] = self.optimizer.state_dict()
        ret["grad_scaler"] = self.grad_scaler.state_dict()
        ret["method"] = self.method.state_dict()
        ret["method_optimizers"] = {name: opt.state_dict() for name, opt in self.method.optimizers().items()}
        ret["method_schedulers"] = {name: s.state_dict() for name, s in self.method.schedulers().items()}
        ret["rng_states"] = self.rng_states
        ret["data_stream_seeds"] = [stream.seed for stream in self.data_loader.streams]
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore everything :meth:`state_dict` saved. The learning rates and weight decay of the config
        win over the checkpoint's (a resumed run after a divergence may lower ``SOLVER.BASE_LR``); every
        change is logged. Moments, step counts and the schedule's position come from the checkpoint."""
        optimizers = {"student": (self.optimizer, self.scheduler)}
        for name, optimizer in self.method.optimizers().items():
            optimizers[name] = (optimizer, self.method.schedulers()[name])
        config_values = {name: _rates(optimizer) for name, (optimizer, _) in optimizers.items()}
        super().load_state_dict(state_dict)
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        self.method.load_state_dict(state_dict["method"])
        for name, optimizer in self.method.optimizers().items():
            optimizer.load_state_dict(state_dict["method_optimizers"][name])
        for name, scheduler in self.method.schedulers().items():
            scheduler.load_state_dict(state_dict["method_schedulers"][name])
        changes = [
            change
            for name, (optimizer, scheduler) in optimizers.items()
            for change in _restore_rates(name, optimizer, scheduler, config_values[name])
        ]
        if changes:
            logger.warning(
                "Resuming with learning rates / weight decay (SOLVER.BASE_LR, HEAD_LR_MULTIPLIER, WEIGHT_DECAY, "
                "WEIGHT_DECAY_NORM, UDA.ADVENT.DISC_LR) that differ from the checkpoint's; the config wins: "
                + "; ".join(changes)
            )
        self._resume_rng_states = state_dict.get("rng_states", [])
        streams = self.data_loader.streams
        seeds = state_dict.get("data_stream_seeds", [])
        if len(seeds) == len(streams):
            for stream, seed in zip(streams, seeds):
                stream.seed = int(seed)
        else:
            logger.warning(
                f"The checkpoint holds the seeds of {len(seeds)} data streams, this run has {len(streams)}; "
                "the data after the resume point differ from those of the interrupted run"
            )

