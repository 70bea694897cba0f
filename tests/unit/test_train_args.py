"""pretrain_gpt.py's flags: Megatron-LM names, grouped --help, clear errors before heavy work."""

import pytest

from megatron_patch.training.arguments import build_parser, parse_and_validate
from megatron_patch.training.errors import SetupError
from tests.train_helpers import tiny_args


def validate(argv, world_size=1):
    return parse_and_validate([str(a) for a in argv], world_size=world_size)


def test_help_groups_megatron_flags_and_stabilization_flags():
    text = build_parser().format_help()
    for group in ("network size:", "training:", "learning rate:", "mixed precision:", "distributed:",
                  "data:", "tokenizer:", "checkpointing:", "logging:", "stabilization (Spike No More, WeSaR):"):
        assert group in text
    for flag in ("--num-layers", "--ffn-hidden-size", "--lr-warmup-iters", "--adam-beta2",
                 "--embedding-init-method-std", "--sequence-parallel", "--use-distributed-optimizer",
                 "--loss-scale", "--split", "--merge-file", "--exit-signal-handler", "--wandb-exp-name",
                 "--scaled-embed", "--embed-layernorm", "--wesar"):
        assert flag in text


# The flags of Megatron-LM's examples/gpt3/train_gpt3_175b_distributed.sh (minus
# --rampup-batch-size, which Megatron-LM itself refuses with --train-iters) and of common
# Llama-style launch scripts.
MEGATRON_LM_SCRIPT = """
--num-layers 96 --hidden-size 12288 --num-attention-heads 96 --seq-length 2048
--max-position-embeddings 2048 --attention-backend auto --micro-batch-size 1
--global-batch-size 1536 --train-iters 500000 --weight-decay 0.1 --adam-beta1 0.9
--adam-beta2 0.95 --init-method-std 0.006 --clip-grad 1.0 --fp16 --lr 6.0e-5
--lr-decay-style cosine --min-lr 6.0e-6 --lr-warmup-fraction .001 --lr-decay-iters 430000
--tensor-model-parallel-size 8 --pipeline-model-parallel-size 16 --data-path /data/x_text_document
--vocab-file /data/vocab.json --merge-file /data/merges.txt --split 949,50,1 --log-interval 100
--save-interval 10000 --eval-interval 1000 --save /ckpt --load /ckpt --eval-iters 10
--tensorboard-dir /tb --use-mcore-models --transformer-impl local --sequence-parallel
--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather --swiglu
--untie-embeddings-and-output-weights --position-embedding-type rope --normalization RMSNorm
--disable-bias-linear --group-query-attention --num-query-groups 8 --ckpt-format torch_dist
--log-throughput --no-masked-softmax-fusion --distributed-timeout-minutes 60 --num-workers 4
--wandb-project p --wandb-exp-name e --exit-signal-handler --embedding-init-method-std 0.006
--scaled-embed
"""


def test_megatron_lm_launch_script_parses():
    args = build_parser().parse_args(MEGATRON_LM_SCRIPT.split())
    assert (args.num_layers, args.hidden_size, args.tensor_model_parallel_size) == (96, 12288, 8)
    assert args.scaled_embed and args.use_distributed_optimizer and args.position_embedding_type == "rope"


def test_defaults_derive_like_megatron_lm(tmp_path):
    args = validate(tiny_args("--train-iters", 10, "--global-batch-size", 16, mock=True), world_size=2)
    assert args.data_parallel_size == 2 and args.num_microbatches == 2
    assert args.lr_decay_iters == 10 and args.max_position_embeddings == 32
    assert args.transformer_config.init_method_std == 0.02
    config = args.transformer_config
    if not __import__("torch").cuda.is_available():  # no fused kernels on CPU, unbatched p2p on gloo
        assert not (config.masked_softmax_fusion or config.bias_activation_fusion
                    or config.bias_dropout_fusion or config.persist_layer_norm or config.batch_p2p_comm)
        assert config.use_cpu_initialization


@pytest.mark.parametrize("extra, world_size, message", [
    (["--no-such-flag"], 1, "unrecognized arguments: --no-such-flag"),
    (["--num-attention-heads", 3, "--hidden-size", 63, "--tensor-model-parallel-size", 2], 2,
     "--num-attention-heads 3 is not divisible by --tensor-model-parallel-size 2"),
    (["--global-batch-size", 10, "--micro-batch-size", 3], 2,
     "--global-batch-size 10 is not divisible by --micro-batch-size 3 x data-parallel size 2"),
    (["--tensor-model-parallel-size", 2], 3, "world size 3 is not divisible by TP (2) x PP (1)"),
    (["--scaled-embed", "--embed-layernorm"], 1, "choose one embedding treatment"),
    (["--small-init", "--init-method-std", 0.01], 1, "--small-init sets sigma itself"),
    (["--fp16", "--bf16"], 1, "--fp16 and --bf16 are exclusive"),
    (["--lr-warmup-iters", 10], 1, "--lr-warmup-iters 10 must be below the decay length 10"),
    (["--rampup-batch-size", 4, 4, 100], 1, "expected no batch-size rampup"),
    (["--num-layers", 3, "--pipeline-model-parallel-size", 2], 2, "--num-layers 3 is not divisible"),
    (["--min-lr", 1.0], 1, "--min-lr 1.0 exceeds --lr"),
])
def test_bad_or_contradictory_flags_are_one_clear_error(extra, world_size, message):
    with pytest.raises(SetupError) as err:
        validate(tiny_args("--train-iters", 10, *extra, mock=True), world_size=world_size)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_data_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(SetupError, match=r"data file .*nothing\.bin not found"):
        validate(tiny_args("--train-iters", 10, data=tmp_path / "nothing"))
    argv = [a for a in tiny_args("--train-iters", 10, mock=True) if a != "--mock-data"]
    with pytest.raises(SetupError, match="no training data"):
        validate(argv)


def test_blended_data_path_weights(tmp_path):
    from tests.train_helpers import make_corpus

    a, b = make_corpus(tmp_path / "a", 30), make_corpus(tmp_path / "b", 30, seed=1)
    args = validate(tiny_args("--train-iters", 5, "--data-path", 0.3, a, 0.7, b, data=a))
    assert args.data_blend == ([a, b], [0.3, 0.7])
