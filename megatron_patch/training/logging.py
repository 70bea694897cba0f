"""Training logs: Megatron-LM's stdout line format, throughput/MFU/memory, TensorBoard and wandb.

Printed (and written to TensorBoard/wandb) by one rank: the first rank of the last pipeline stage
(TP rank 0, DP rank 0), which holds the loss.
"""

import importlib.util
import math
import os
from datetime import datetime

import torch

from .errors import SetupError


def add_logging_args(parser):
    g = parser.add_argument_group("logging",
                                  "Megatron-LM's log line, TensorBoard and wandb flags, plus MFU (--peak-tflops).")
    g.add_argument("--log-interval", type=int, default=100, help="Print a log line every N steps.")
    g.add_argument("--tensorboard-dir", default=None, help="Write TensorBoard events here.")
    g.add_argument("--tensorboard-log-interval", type=int, default=1, help="TensorBoard scalars every N steps.")
    g.add_argument("--tensorboard-queue-size", type=int, default=1000,
                   help="Events TensorBoard buffers before a flush.")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true",
                   help="Also log validation perplexity to TensorBoard.")
    g.add_argument("--log-memory-to-tensorboard", action="store_true", help="Also log memory use to TensorBoard.")
    g.add_argument("--log-timers-to-tensorboard", action="store_true", help="Accepted.")
    g.add_argument("--log-throughput", action="store_true", help="Accepted; always logged.")
    g.add_argument("--log-params-norm", action="store_true", help="Accepted.")
    g.add_argument("--log-num-zeros-in-grad", action="store_true", help="Accepted.")
    g.add_argument("--timing-log-level", type=int, default=0, help="Accepted.")
    g.add_argument("--wandb-project", default="", help="wandb project (empty: no wandb).")
    g.add_argument("--wandb-exp-name", default="", help="wandb run name.")
    g.add_argument("--wandb-save-dir", default="", help="wandb's local directory (default: under --save).")
    g.add_argument("--wandb-entity", default="", help="wandb team or user.")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="Peak TFLOP/s of one device (e.g. 989 for H100 bf16 dense) to report MFU.")
    return parser


def validate_logging_args(args) -> None:
    if args.log_interval <= 0:
        raise SetupError("--log-interval must be > 0")
    if args.tensorboard_dir and importlib.util.find_spec("torch.utils.tensorboard") is None:
        raise SetupError("--tensorboard-dir needs the tensorboard package (pip install tensorboard)")
    if args.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        raise SetupError("--tensorboard-dir needs the tensorboard package (pip install tensorboard)")
    if args.wandb_project and importlib.util.find_spec("wandb") is None:
        raise SetupError("--wandb-project needs wandb (pip install wandb); WANDB_MODE=offline works offline")
    if args.wandb_exp_name and not args.wandb_project:
        raise SetupError("--wandb-exp-name needs --wandb-project")


def training_flops_per_token(args, padded_vocab_size: int) -> float:
    """Matmul FLOPs per token for forward + backward (3 x forward), no recomputation.

    Per layer: QKV, output projection and the FFN (x2 input for GLU), plus attention scores and
    values over the full sequence; plus the logits. For MHA and a 4h FFN this is Megatron's
    72*L*h^2 + 12*L*s*h + 6*V*h.
    """
    h, s, L = args.hidden_size, args.seq_length, args.num_layers
    f = args.ffn_hidden_size or 4 * h
    q = (args.kv_channels or h // args.num_attention_heads) * args.num_attention_heads
    kv = q if not args.group_query_attention else q // args.num_attention_heads * args.num_query_groups
    layer = 2 * (h * (q + 2 * kv) + q * h + h * f * (2 if args.swiglu else 1) + f * h) + 4 * s * q
    return 3.0 * (L * layer + 2 * h * padded_vocab_size)


def _memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class TrainingLogger:
    def __init__(self, args, padded_vocab_size: int, world_size: int):
        from megatron.core import parallel_state as ps

        self.args, self.world_size = args, world_size
        self.is_logging_rank = (ps.is_pipeline_last_stage(ignore_virtual=True)
                                and ps.get_tensor_model_parallel_rank() == 0
                                and ps.get_data_parallel_rank() == 0)
        self.flops_per_iteration = (training_flops_per_token(args, padded_vocab_size)
                                    * args.global_batch_size * args.seq_length)
        self.writer = self.wandb = None
        if self.is_logging_rank and args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=args.tensorboard_queue_size)
        if self.is_logging_rank and args.wandb_project:
            import wandb

            save_dir = args.wandb_save_dir or os.path.join(args.save or args.tensorboard_dir or ".", "wandb")
            os.makedirs(save_dir, exist_ok=True)
            self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_exp_name or None,
                                    entity=args.wandb_entity or None, dir=save_dir,
                                    config={k: v for k, v in vars(args).items()
                                            if isinstance(v, (int, float, str, bool, type(None)))})
        self._reset_interval()

    def _reset_interval(self):
        self.loss_sum, self.loss_count, self.nans = 0.0, 0, 0
        self.z_sum, self.z_count = 0.0, 0
        self.skipped = {}  # skip reason -> count (see loop.train_step)
        self.time_sum, self.iters = 0.0, 0

    def print(self, text: str) -> None:
        if self.is_logging_rank:
            print(text, flush=True)

    def log_scalar(self, tag, value, step):
        """One scalar to TensorBoard and wandb (whichever are on; only the logging rank has them)."""
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log({tag: value}, step=step)

    def log_iteration(self, iteration, consumed_samples, loss, lr, loss_scale, grad_norm, skip_reason,
                      step_time, z_loss=None):
        """Accumulate one iteration; print every --log-interval. `loss` is None off the last stage;
        `skip_reason` None for an applied update, else why it was skipped (loop.SKIP_*).

        `step_time` (s) covers the train step only: evaluation and checkpoints are excluded, as the
        interval timer of Megatron-LM excludes them.
        """
        args = self.args
        self.iters += 1
        self.time_sum += step_time
        skipped = skip_reason is not None
        if skipped:
            self.skipped[skip_reason] = self.skipped.get(skip_reason, 0) + 1
        elif loss is not None and not math.isfinite(loss):
            self.nans += 1
        elif loss is not None:
            self.loss_sum += loss
            self.loss_count += 1
            if z_loss is not None:
                self.z_sum, self.z_count = self.z_sum + z_loss, self.z_count + 1
        if self.is_logging_rank and iteration % args.tensorboard_log_interval == 0:
            self.log_scalar("learning-rate", lr, iteration)
            self.log_scalar("batch-size", args.global_batch_size, iteration)
            if loss is not None and not skipped:
                self.log_scalar("lm loss", loss, iteration)
                if z_loss is not None:
                    self.log_scalar("z loss", z_loss, iteration)
            self.log_scalar("loss-scale", loss_scale, iteration)
            if grad_norm is not None:
                self.log_scalar("grad-norm", grad_norm, iteration)
            if args.log_memory_to_tensorboard:
                self.log_scalar("mem-max-allocated-mib", _memory_mib(), iteration)
        if iteration % args.log_interval:
            return
        elapsed = self.time_sum / max(self.iters, 1)
        tokens_per_s = args.global_batch_size * args.seq_length / elapsed
        tflops = self.flops_per_iteration / elapsed / self.world_size / 1e12
        if self.is_logging_rank:
            self.log_scalar("tokens-per-second", tokens_per_s, iteration)
            self.log_scalar("throughput-tflops-per-device", tflops, iteration)
            line = (f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S')}]"
                    f" iteration {iteration:8d}/{args.train_iters:8d} |"
                    f" consumed samples: {consumed_samples:12d} |"
                    f" elapsed time per iteration (ms): {elapsed * 1000.0:.1f} |"
                    f" learning rate: {lr:.6E} |"
                    f" global batch size: {args.global_batch_size:5d} |")
            if self.loss_count:
                line += f" lm loss: {self.loss_sum / self.loss_count:.6E} |"
            if self.z_count:
                line += f" z loss: {self.z_sum / self.z_count:.6E} |"
            line += f" loss scale: {loss_scale:.1f} |"
            if grad_norm is not None:
                line += f" grad norm: {grad_norm:.3f} |"
            skips = sum(self.skipped.values())
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items()))
            line += (f" number of skipped iterations: {skips:3d}{f' ({reasons})' if skips else ''} |"
                     f" number of nan iterations: {self.nans:3d} |"
                     f" tokens per second: {tokens_per_s:.1f} |"
                     f" TFLOP/s per device: {tflops:.4g} |")
            if args.peak_tflops:
                line += f" MFU: {100.0 * tflops / args.peak_tflops:.2f}% |"
            line += f" memory (MiB): {_memory_mib():.0f} |"
            print(line, flush=True)
        self._reset_interval()

    def log_evaluation(self, label, iteration, loss):
        # exp(min(20, nan)) would print a finite perplexity for a NaN loss: NaN stays NaN.
        ppl = math.exp(min(20.0, loss)) if not math.isnan(loss) else float("nan")
        text = f" validation loss at {label} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "
        bar = "-" * (len(text) + 1)
        self.print(f"{bar}\n{text}\n{bar}")
        if self.is_logging_rank:
            self.log_scalar("lm loss validation", loss, iteration)
            if self.args.log_validation_ppl_to_tensorboard:
                self.log_scalar("lm loss validation ppl", ppl, iteration)
        return ppl

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
