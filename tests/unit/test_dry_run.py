"""--dry-run: exact parameter counts (against real builds), the memory formulas, the layout chooser."""

import re

import pytest

from megatron_patch.model import build_gpt_model
from megatron_patch.training import dry_run
from megatron_patch.training.arguments import parse_and_validate
from megatron_patch.training.errors import SetupError
from megatron_patch.training.model_builder import padded_vocab_size

TINY = ("--num-layers 3 --hidden-size 48 --num-attention-heads 4 --seq-length 16 --micro-batch-size 2 "
        "--train-iters 1 --lr 1e-3 --mock-data --vocab-size 100 --make-vocab-size-divisible-by 8").split()

OPTIONS = {
    "stock tied": "",
    "stock untied": "--untie-embeddings-and-output-weights",
    "swiglu no-bias rmsnorm rope untied": "--swiglu --disable-bias-linear --normalization RMSNorm "
                                          "--position-embedding-type rope --untie-embeddings-and-output-weights",
    "embed LN + GQA + qk-layernorm": "--embed-layernorm --group-query-attention --num-query-groups 2 --qk-layernorm",
    "WeSaR untied": "--wesar --untie-embeddings-and-output-weights",
    "WeSaR tied, RMSNorm embed LN": "--wesar --embed-layernorm --normalization RMSNorm",
    "scaled embed, odd ffn and kv-channels": "--scaled-embed --ffn-hidden-size 72 --kv-channels 8 "
                                             "--max-position-embeddings 40",
    "embed detach, no position table": "--embed-detach-alpha 0.1 --position-embedding-type none",
}


def plan_for(extra, world_size=1):
    return dry_run.parse_for_plan(TINY + extra.split(), world_size)


def built_parameters(extra) -> int:
    """Parameters of the model the trainer builds for these flags (validated as on this CPU)."""
    args = parse_and_validate(TINY + extra.split(), world_size=1)
    model = build_gpt_model(
        args.transformer_config, padded_vocab_size(args.vocab_size + 1, args), args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, transformer_impl="local")
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.mark.parametrize("name", OPTIONS)
def test_parameter_count_equals_a_real_build(mcore, name):
    args = plan_for(OPTIONS[name])
    p = dry_run.plan(args)
    assert p["parameters"] == built_parameters(OPTIONS[name])
    assert p["memory"].parameters == p["parameters"]  # one GPU holds everything at TP = PP = 1


def test_report_prints_exact_count_and_every_memory_part(capsys):
    args = plan_for("--untie-embeddings-and-output-weights")
    assert dry_run.run_dry_run(args) == 0
    out = capsys.readouterr().out
    count = int(re.search(r"^parameters: (\d+)$", out, re.M).group(1))
    assert count == dry_run.plan(args)["parameters"]
    for part in ("weights", "grads", "optimizer", "activations", "tokens per step: 32", "FLOPs per step"):
        assert part in out
    assert "(no pipeline: every layer)" in out


def test_time_per_run_is_train_flops_over_the_named_throughput(capsys):
    args = plan_for("--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 "
                    "--train-iters 50000 --global-batch-size 512", world_size=8)
    p = dry_run.plan(args)
    seconds = args.train_iters * p["flops_per_step"] / (args.world_size * 989e12 * 0.40)
    assert dry_run.days_per_run(args, p["flops_per_step"]) == pytest.approx(seconds / 86400, rel=1e-12)
    dry_run.run_dry_run(args)
    line = re.search(r"^time per run: (\S+) days for (\d+) steps .*assuming 40% MFU of an H100's 989 .*$",
                     capsys.readouterr().out, re.M)
    assert line and int(line.group(2)) == args.train_iters
    assert seconds / 86400 > 1 and line.group(1) == f"{seconds / 86400:.1f}"


def test_does_not_fit_fails_with_one_line(capsys):
    args = plan_for("--gpu-memory-gb 0.0001")
    assert dry_run.run_dry_run(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "more than --gpu-memory-gb" in err


def test_main_validates_fp16_for_the_gpu_cluster_on_a_cpu_machine(capsys):
    assert dry_run.main(TINY + ["--fp16", "--world-size", "2", "--global-batch-size", "8"]) == 0
    assert "world 2 = TP 1 x PP 1 x DP 2" in capsys.readouterr().out


def test_activation_formula_reduces_to_korthikanti_table2():
    """16-bit, 4h FFN, MHA: sbh(34 + 5as/h) (TP=1), sbh(10 + 24/t + 5as/ht) (TP), sbh/t(34 + 5as/h) (TP+SP)."""
    s, b, h, a = 16, 2, 48, 4
    common = TINY + ["--fp16", "--transformer-impl", "local", "--global-batch-size", "8"]
    for tp, sp, expected in ((1, "", s * b * h * (34 + 5 * a * s / h)),
                             (2, "", s * b * h * (10 + 24 / 2 + 5 * a * s / (h * 2))),
                             (2, "--sequence-parallel", s * b * h / 2 * (34 + 5 * a * s / h))):
        argv = common + ["--tensor-model-parallel-size", str(tp)] + sp.split()
        args = dry_run.parse_for_plan(argv, 2)
        assert dry_run.layer_activation_bytes(args, args.transformer_config) == pytest.approx(expected)
    flash = dry_run.parse_for_plan(TINY + ["--fp16", "--transformer-impl", "transformer_engine"], 1)
    assert dry_run.layer_activation_bytes(flash, flash.transformer_config) == pytest.approx(s * b * h * 34)


def test_state_bytes_per_parameter_mixed_precision_distributed_optimizer():
    args = dry_run.parse_for_plan(TINY + ["--bf16", "--accumulate-allreduce-grads-in-fp32",
                                          "--use-distributed-optimizer", "--global-batch-size", "8"], 4)
    mem = dry_run.plan(args)["memory"]
    n = mem.parameters
    assert (mem.weights, mem.grads, mem.optimizer) == (2 * n, 4 * n, pytest.approx(12 * n / 4))


def test_tensor_parallel_shards_count_to_the_whole_model():
    """Per-rank shards x TP + what is replicated = the TP=1 model (vocab padded alike)."""
    flags = "--untie-embeddings-and-output-weights --make-vocab-size-divisible-by 64 --global-batch-size 2"
    one, two = plan_for(flags), plan_for(flags + " --tensor-model-parallel-size 2", world_size=2)
    cfg = one.transformer_config
    replicated_per_layer = 2 * 2 * 48 + 2 * 48  # 2 LayerNorms + row-parallel biases (proj, fc2)
    replicated = 3 * replicated_per_layer + 16 * 48 + 2 * 48  # + position table + final norm
    shard = dry_run.stage_parameters(two, cfg, 128, True, True).total
    assert 2 * (shard - replicated) + replicated == dry_run.plan(one)["parameters"]


SIZE_13B = ("--num-layers 40 --hidden-size 5120 --num-attention-heads 40 --seq-length 2048 "
            "--global-batch-size 528 --micro-batch-size 1 --train-iters 1 --lr 1e-4 --mock-data "
            "--vocab-size 50257 --fp16 --use-distributed-optimizer --accumulate-allreduce-grads-in-fp32 "
            "--transformer-impl transformer_engine").split()


def test_layout_chooser_picks_least_model_parallelism_that_fits():
    flags, args = dry_run.choose_layout(SIZE_13B, world_size=32, gpus_per_node=8)
    assert args.tensor_model_parallel_size * args.pipeline_model_parallel_size > 1  # 13B: 16 bytes/param
    assert dry_run.plan(args)["fits"]
    assert args.global_batch_size == 528 and args.data_parallel_size * args.tensor_model_parallel_size \
        * args.pipeline_model_parallel_size == 32
    assert "--sequence-parallel" in flags


def test_layout_chooser_refuses_what_cannot_fit_or_divide():
    with pytest.raises(SetupError, match="no layout of 1 GPUs fits"):
        dry_run.choose_layout(SIZE_13B, world_size=1, gpus_per_node=1)
    with pytest.raises(SetupError, match="divides --global-batch-size 528"):
        dry_run.choose_layout(SIZE_13B, world_size=56, gpus_per_node=8)


def test_pretrain_gpt_dry_run_flag(capsys):
    """pretrain_gpt.py's parser carries the dry-run flags, and its main() dispatches --dry-run."""
    from megatron_patch.training import arguments, pretrain

    assert "--dry-run" in arguments.build_parser().format_help()
    assert dry_run.main(TINY + ["--dry-run"]) == 0
    assert pretrain.main(TINY + ["--dry-run"]) == 0
    assert capsys.readouterr().out.count("parameters: ") >= 2
