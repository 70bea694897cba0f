"""StabilityMonitor: the trainer callback that measures, detects spikes and acts on them.

Every `--monitor-interval` steps (and on every spike) it records per-layer gradient norms by
parameter group, per-layer residual-stream std at each pre-LN, and per-group update norms and
update/weight ratios, to a compact jsonl (`--monitor-dir`) and to TensorBoard/wandb through the
trainer's logger. `--spike-signal` chooses what the detector watches: the loss and the gradient
norm (before the update), and/or the norm of Adam's update (after it, every step).

Spike policy (`--spike-policy`):
  log       record the spike with the step's per-layer stats, apply the update anyway;
  skip      do not apply the update (every rank agrees: the trainer combines the votes);
  rollback  as skip, and after `--rollback-after` spikes within `--rollback-window` steps ask the
            trainer to reload the last good checkpoint, optionally skipping the data that came
            after it (`--rollback-skip-data`) and scaling the lr by `--rollback-lr-factor` for
            `--rollback-lr-steps` steps.
A non-finite loss or gradient norm is never applied, whatever the policy. Under fp16 with dynamic
loss scaling it is an overflow, the loss scaler's business, not a spike: the monitor lets
megatron-core's step find it (that step skips the update and lowers the scale) and keeps it out
of the detector's window. Vetoing it instead would keep the scale where it overflows, and every
later step would be skipped.
"""

import json
import math
import os
from collections import deque

import torch

from .activation_stats import ActivationStats
from ..training.callbacks import Callback
from .grad_stats import key_name, named_parameter_groups, squared_norms, unwrap
from .spike_detector import SpikeDetector, SpikeEvent
from .update_stats import adam_update_norm, step_lrs


SIGNALS = ("loss", "grad_norm", "update_norm")


def add_monitor_args(parser):
    g = parser.add_argument_group("stability monitor (per-layer stats, spike detection)",
                                  "This package's: off by default (docs/monitor.md).")
    g.add_argument("--monitor-interval", type=int, default=0,
                   help="Record per-layer statistics every K steps (0: monitor off).")
    g.add_argument("--monitor-dir", default=None, help="Where to write monitor.jsonl (default: --save or cwd).")
    g.add_argument("--monitor-update-ratio", action="store_true",
                   help="Also record per-group update norms and update/weight ratios (keeps an fp32 "
                        "copy of the weights during measured steps only).")
    g.add_argument("--spike-policy", choices=["off", "log", "skip", "rollback"], default="off",
                   help="What to do on a spike of the --spike-signal values (non-finite losses and "
                        "gradients are never applied).")
    g.add_argument("--spike-signal", nargs="+", choices=list(SIGNALS) + ["any"], default=["loss", "grad_norm"],
                   help="What the detector watches: loss, grad_norm (before the update: a spike is "
                        "skipped), update_norm (the norm of Adam's update, read from its state after "
                        "the step: a spike is recorded and counts toward a rollback, but cannot be "
                        "skipped), or any (all three).")
    g.add_argument("--spike-window", type=int, default=64,
                   help="Healthy steps the statistics use (64: on the spike sweep's runs it caught as "
                        "many bursts as 32 with fewer false flags, and more than 128, whose window "
                        "still held the early high norms; see studies/spike_rule_eval.py).")
    g.add_argument("--spike-min-history", type=int, default=16,
                   help="Healthy steps the detector needs before it can flag a spike.")
    g.add_argument("--spike-zscore", type=float, default=6.0, help="Flag x > mean + Z*std (<=0: off).")
    g.add_argument("--spike-ratio", type=float, default=0.0, help="Flag x > R*median (<=0: off).")
    g.add_argument("--rollback-after", type=int, default=3, help="Spikes that trigger a rollback.")
    g.add_argument("--rollback-window", type=int, default=50, help="...within this many steps.")
    g.add_argument("--rollback-skip-data", action="store_true",
                   help="After a rollback, continue with the data that follows the spikes.")
    g.add_argument("--rollback-lr-factor", type=float, default=1.0,
                   help="After a rollback, multiply the lr by this for --rollback-lr-steps steps.")
    g.add_argument("--rollback-lr-steps", type=int, default=0,
                   help="Steps of the reduced lr after a rollback (0: none).")
    g.add_argument("--rollback-max", type=int, default=5,
                   help="At most this many rollbacks per run; after that spikes are only skipped.")
    return parser


def monitor_enabled(args) -> bool:
    return bool(args.monitor_interval) or args.spike_policy != "off"


def validate_monitor_args(args, fail) -> None:
    if args.monitor_interval < 0:
        fail("--monitor-interval must be >= 0")
    if args.spike_policy != "off" and args.spike_zscore <= 0 and args.spike_ratio <= 0:
        fail("--spike-policy needs --spike-zscore > 0 or --spike-ratio > 0")
    if args.spike_policy == "rollback" and not args.save:
        fail("--spike-policy rollback needs --save: the checkpoints it goes back to (the first, "
             "iteration 0, is written at the start)")
    if not 0 < args.rollback_lr_factor <= 1:
        fail("--rollback-lr-factor must be in (0, 1]")
    args.spike_signal = list(SIGNALS) if "any" in args.spike_signal else list(dict.fromkeys(args.spike_signal))
    if "update_norm" in args.spike_signal and getattr(args, "optimizer", "adam") != "adam":
        fail("--spike-signal update_norm reads Adam's moments; it needs --optimizer adam")


class StabilityMonitor(Callback):
    def __init__(self, args, logger=None):
        self.args, self.logger = args, logger
        self.interval = args.monitor_interval
        self.detector = SpikeDetector(
            window=args.spike_window, min_history=args.spike_min_history,
            z_threshold=args.spike_zscore if args.spike_zscore > 0 else None,
            ratio_threshold=args.spike_ratio if args.spike_ratio > 0 else None,
            metrics=tuple(getattr(args, "spike_signal", ("loss", "grad_norm"))))
        self.recent_spikes, self.rollbacks = deque(), 0
        self.dynamic_loss_scaling = bool(getattr(args, "fp16", False)) and not getattr(args, "loss_scale", None)
        self.spike_log = []  # every SpikeEvent, for callers and tests
        self._acts = self._snapshot = self._record = None
        self._writer = None

    # ----- helpers
    def _chunks(self, state):
        return [unwrap(c) for c in state.model]

    def _measured(self, iteration) -> bool:
        return bool(self.interval) and iteration % self.interval == 0

    def _is_writer_rank(self) -> bool:
        from megatron.core import parallel_state as ps

        return ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0 \
            and ps.get_data_parallel_rank() == 0

    def _write(self, record):
        if not self._is_writer_rank():
            return
        if self._writer is None:
            root = self.args.monitor_dir or self.args.save or "."
            os.makedirs(root, exist_ok=True)
            self._writer = open(os.path.join(root, "monitor.jsonl"), "a")
        self._writer.write(json.dumps(record) + "\n")
        self._writer.flush()
        if self.logger is not None:
            step = record["iteration"]
            for section in ("grad_norm", "act_std", "update_ratio", "update_norm"):
                for k, v in record.get(section, {}).items():
                    self.logger.log_scalar(f"monitor/{section}/{k}", v, step)

    @staticmethod
    def _grad_norm_on_all_ranks(grad_norm: float) -> float:
        """Max over data-parallel ranks, non-finite if any rank's is: gradients are meant to be
        identical after the all-reduce, and a fault on one rank must be seen by all."""
        from megatron.core import parallel_state

        if not (torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized()):
            return grad_norm
        bad = not math.isfinite(grad_norm)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        t = torch.tensor([0.0 if bad else grad_norm, 1.0 if bad else 0.0], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX,
                                     group=parallel_state.get_data_parallel_group())
        return float("nan") if t[1].item() > 0 else t[0].item()

    # ----- trainer hooks
    def attach_logger(self, logger):
        """The trainer's TrainingLogger (TensorBoard / wandb), given once it exists."""
        self.logger = logger

    def on_step_start(self, state):
        if self._measured(state.iteration):
            self._acts = ActivationStats(self._chunks(state), self.args.num_layers).__enter__()

    def on_before_optimizer_step(self, state) -> bool:
        loss_scale = float(state.optimizer.get_loss_scale())
        grad_norm = self._grad_norm_on_all_ranks(state.current_grad_norm() / loss_scale)
        finite = math.isfinite(grad_norm) and (state.loss is None or math.isfinite(state.loss))
        if self.dynamic_loss_scaling and not finite:  # an overflow: the scaler skips it (module doc)
            self._record = {"iteration": state.iteration, "loss": state.loss, "grad_norm_total": grad_norm,
                            "overflow": True, "skipped": True}
            return False
        if "update_norm" in self.detector.windows:
            self._step_lrs = step_lrs(state.optimizer)  # the scheduler moves them after the step
        spikes = self.detector.observe(state.iteration, loss=state.loss, grad_norm=grad_norm)
        if not finite and not any(e.reason == "non-finite" for e in spikes):  # a signal not watched
            metric, value = ("grad_norm", grad_norm) if not math.isfinite(grad_norm) else ("loss", state.loss)
            spikes.append(SpikeEvent(state.iteration, metric, value, "non-finite", float("nan")))
        non_finite = not finite
        # One compact line per step (the loss curve); per-layer sections on measured/spike steps.
        self._record = {"iteration": state.iteration, "loss": state.loss, "grad_norm_total": grad_norm}
        if spikes:
            self._record["spikes"] = [e.as_dict() for e in spikes]
        if spikes or self._measured(state.iteration):
            norms = squared_norms(state.model, self.args.num_layers, loss_scale=loss_scale,
                                  optimizer=state.optimizer)
            self._record["grad_norm"] = {key_name(k): math.sqrt(v) for k, v in norms.items()}
            if self._acts is not None:
                self._acts.__exit__(None, None, None)
                self._record["act_std"] = {key_name(k): v for k, v in self._acts.result().items()}
                self._acts = None
            if self.args.monitor_update_ratio and self._measured(state.iteration):
                self._snapshot = [(key, p, p.detach().float().clone())
                                  for key, _, p in named_parameter_groups(self._chunks(state))]
        if spikes:
            self.spike_log += spikes
            self.recent_spikes.append(state.iteration)
        skip = non_finite or (bool(spikes) and self.args.spike_policy in ("skip", "rollback"))
        self._record["skipped"] = skip
        return skip

    def on_step_end(self, state):
        if self._acts is not None:  # measured step that never reached the optimizer hook
            self._acts.__exit__(None, None, None)
            self._acts = None
        if self._snapshot is not None:
            self._record["update_ratio"], self._record["update_norm"] = self._update_ratios()
            self._snapshot = None
        if "update_norm" in self.detector.windows and self._record is not None and not state.skipped:
            self._observe_update_norm(state)
        if self._record is not None:
            self._write(self._record)
            self._record = None
        self._maybe_request_rollback(state)

    def _observe_update_norm(self, state):
        """Detect on the update the step just applied (cannot be skipped: counted, for rollback)."""
        norm = adam_update_norm(state.optimizer, self._step_lrs)
        self._record["update_norm_total"] = norm
        spikes = self.detector.observe(state.iteration, update_norm=norm)
        if spikes:
            self._record.setdefault("spikes", []).extend(e.as_dict() for e in spikes)
            self.spike_log += spikes
            if not self.recent_spikes or self.recent_spikes[-1] != state.iteration:
                self.recent_spikes.append(state.iteration)

    def _update_ratios(self):
        """({group: |update| / |weight|}, {group: |update|}) of the step just applied."""
        from megatron.core import parallel_state

        keys = sorted({k for k, _, _ in self._snapshot}, key=str)
        index = {k: i for i, k in enumerate(keys)}
        sums = torch.zeros(len(keys), 2, dtype=torch.float64)
        for key, p, before in self._snapshot:
            sums[index[key], 0] += (p.detach().float() - before).double().pow(2).sum().item()
            sums[index[key], 1] += before.double().pow(2).sum().item()
        # Keys differ across PP stages: reduce over a fixed vector built from the gathered names.
        if torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized():
            group = parallel_state.get_model_parallel_group()
            gathered = [None] * torch.distributed.get_world_size(group)
            torch.distributed.all_gather_object(gathered, {key_name(k): sums[i].tolist() for k, i in index.items()},
                                                group=group)
            total = {}
            for part in gathered:
                for name, (du, w) in part.items():
                    a, b = total.get(name, (0.0, 0.0))
                    total[name] = (a + du, b + w)
        else:
            total = {key_name(k): tuple(sums[i].tolist()) for k, i in index.items()}
        ratios = {name: math.sqrt(du / w) for name, (du, w) in total.items() if w > 0}
        return ratios, {name: math.sqrt(du) for name, (du, _) in total.items()}

    def _maybe_request_rollback(self, state):
        if self.args.spike_policy != "rollback":
            return
        while self.recent_spikes and self.recent_spikes[0] <= state.iteration - self.args.rollback_window:
            self.recent_spikes.popleft()
        if len(self.recent_spikes) >= self.args.rollback_after and self.rollbacks < self.args.rollback_max:
            self.recent_spikes.clear()
            self.rollbacks += 1
            state.extra["rollback"] = dict(skip_data=self.args.rollback_skip_data,
                                           lr_factor=self.args.rollback_lr_factor,
                                           lr_steps=self.args.rollback_lr_steps)

    def on_train_end(self, state):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
