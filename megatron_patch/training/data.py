"""Tokenizer, datasets (megatron-core GPTDataset over .bin/.idx, blends, splits) and batch iterators.

Every rank builds the same datasets and reads its own micro-batches (no broadcast over TP): the
samples are a pure function of (seed, data, consumed samples), so a resumed run continues
exactly where it stopped.
"""

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .errors import SetupError

_SPLITS = ("train", "validation", "test")


class _MockCacheNoise(logging.Filter):
    """Mock data has nothing worth caching; megatron-core warns about it three times per run."""

    def filter(self, record):
        return "indexes because path_to_cache is None" not in record.getMessage()


logging.getLogger("megatron.core.datasets.gpt_dataset").addFilter(_MockCacheNoise())


def add_data_args(parser):
    g = parser.add_argument_group("data",
                                  "Megatron-LM's flags: same names, defaults and meaning; blends as 'W1 P1 W2 P2'.")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="Prefixes of .bin/.idx files, optionally weighted: 'W1 P1 W2 P2 ...'.")
    g.add_argument("--split", default="969, 30, 1", help="train,valid,test proportions.")
    g.add_argument("--train-data-path", nargs="*", default=None,
                   help="Training data only (prefixes, optionally weighted), instead of --data-path + --split.")
    g.add_argument("--valid-data-path", nargs="*", default=None,
                   help="Validation data only (prefixes, optionally weighted).")
    g.add_argument("--test-data-path", nargs="*", default=None,
                   help="Test data only (prefixes, optionally weighted).")
    g.add_argument("--mock-data", action="store_true", help="Random tokens, no files.")
    g.add_argument("--data-cache-path", default=None, help="Where dataset index caches go.")
    g.add_argument("--no-mmap-bin-files", dest="mmap_bin_files", action="store_false",
                   help="Read the .bin files without memory-mapping them.")
    g.add_argument("--mmap-bin-files", dest="mmap_bin_files", action="store_true", default=True,
                   help="Memory-map the .bin files.")
    g.add_argument("--num-workers", type=int, default=2,
                   help="> 0: read the next micro-batch in a background thread; 0: inline.")
    g.add_argument("--seq-length", type=int, default=None, help="Tokens per sequence (required).")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="Restart position ids after each end-of-document token.")
    g.add_argument("--reset-attention-mask", action="store_true", help="Do not attend across end-of-document tokens.")
    g.add_argument("--eod-mask-loss", action="store_true", help="No loss on end-of-document tokens.")
    g.add_argument("--no-create-attention-mask-in-dataloader", dest="create_attention_mask_in_dataloader",
                   action="store_false", help="Let the model build the causal mask instead of the data loader.")

    g = parser.add_argument_group("tokenizer", "Megatron-LM's flags: same names, defaults and meaning.")
    g.add_argument("--tokenizer-type", default=None,
                   choices=["SentencePieceTokenizer", "GPTSentencePieceTokenizer", "GPT2BPETokenizer",
                            "NullTokenizer"],
                   help="Tokenizer kind (the .bin/.idx must have been made with the same one).")
    g.add_argument("--tokenizer-model", default=None, help="SentencePiece .model file.")
    g.add_argument("--vocab-file", default=None, help="GPT-2 BPE vocab.json.")
    g.add_argument("--merge-file", default=None, help="GPT-2 BPE merges.txt.")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="NullTokenizer: number of ids (the end-of-document id is this number).")
    return parser


def _blend(paths):
    from megatron.core.datasets.utils import get_blend_from_list

    if not paths:
        return None
    try:
        return get_blend_from_list(paths)
    except (ValueError, AssertionError) as exc:
        raise SetupError(f"--data-path {' '.join(paths)}: {exc}") from None


def parse_split(split: str):
    """'969, 30, 1' -> [969.0, 30.0, 1.0] (Megatron-LM's train,valid,test weights); SetupError if not."""
    try:
        weights = [float(w) for w in split.replace("/", ",").split(",")]
    except ValueError:
        raise SetupError(f"--split {split!r}: expected up to three numbers, e.g. 969,30,1") from None
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise SetupError(f"--split {split!r}: expected up to three non-negative numbers with a positive sum")
    return weights + [0.0] * (3 - len(weights))


def _check_blend_weights(flag, blend) -> None:
    """'W1 P1 W2 P2 ...': every weight finite and > 0 (megatron-core's BlendedDataset asserts on
    a 0, and blends NaN); a list of prefixes alone (odd length or no numbers) is equal weights."""
    if len(blend) < 2 or len(blend) % 2:
        return
    try:
        weights = [float(w) for w in blend[0::2]]
    except ValueError:
        return  # prefixes alone: megatron-core's parser names a malformed mix
    for w, prefix in zip(weights, blend[1::2]):
        if w < 0:
            raise SetupError(f"{flag}: blend weight {w:g} is negative; weights must be > 0")
        if not math.isfinite(w):
            raise SetupError(f"{flag}: blend weight {w:g} is not a finite number; weights must be > 0")
        if w == 0:
            raise SetupError(f"{flag}: blend weight 0 for {prefix}; weights must be > 0 (leave a dataset "
                             "you do not want out of the blend)")


def validate_data_args(args) -> None:
    """Cheap checks on flags and files, before any process group or model exists."""
    if args.num_workers < 0:
        raise SetupError(f"--num-workers {args.num_workers}: must be >= 0 (0 loads batches in the trainer)")
    for flag in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
        _check_blend_weights(f"--{flag.replace('_', '-')}", getattr(args, flag) or [])
    per_split = [args.train_data_path, args.valid_data_path, args.test_data_path]
    split = parse_split(args.split)
    if (args.data_path or args.mock_data) and split[1] == 0 and args.eval_iters > 0:
        raise SetupError(f"--split {args.split} leaves no validation data, but --eval-iters {args.eval_iters} "
                         "asks for it: give the split a validation part, or pass --eval-iters 0")
    if any(per_split) and not args.valid_data_path and args.eval_iters > 0:
        raise SetupError(f"--eval-iters {args.eval_iters} asks for validation data, but only "
                         + ", ".join(f"--{n}-data-path" for n, p in zip(("train", "valid", "test"), per_split) if p) +
                         " is given: add --valid-data-path, or pass --eval-iters 0")
    if args.mock_data and (args.data_path or any(per_split)):
        raise SetupError("--mock-data and --data-path are exclusive")
    if args.data_path and any(per_split):
        raise SetupError("give --data-path with --split, or --train/valid/test-data-path, not both")
    if not args.mock_data and not args.data_path and not any(per_split):
        raise SetupError("no training data: pass --data-path PREFIX (a .bin/.idx pair) or --mock-data")
    args.data_blend = _blend(args.data_path)
    args.data_blend_per_split = [_blend(p) for p in per_split] if any(per_split) else None
    blends = [args.data_blend] + (args.data_blend_per_split or [])
    from megatron_patch.data_identity import pair_problem

    for blend in filter(None, blends):
        for prefix in blend[0]:
            for ext in (".bin", ".idx"):
                if not os.path.isfile(prefix + ext):
                    raise SetupError(f"data file {prefix + ext} not found (give the prefix without "
                                     ".bin/.idx; make it with tools/preprocess_data.py)")
            problem = pair_problem(prefix)
            if problem:
                raise SetupError(problem)
    if args.tokenizer_type is None:  # infer from the files given, else refuse
        if args.vocab_file and args.merge_file:
            args.tokenizer_type = "GPT2BPETokenizer"
        elif args.tokenizer_model:
            args.tokenizer_type = "SentencePieceTokenizer"
        elif args.mock_data and args.vocab_size:
            args.tokenizer_type = "NullTokenizer"
        else:
            raise SetupError("--tokenizer-type is required (with --tokenizer-model, or --vocab-file "
                             "and --merge-file; NullTokenizer with --vocab-size for --mock-data)")
    if args.tokenizer_type == "NullTokenizer" and args.vocab_size is None:
        raise SetupError("--tokenizer-type NullTokenizer needs --vocab-size")


class NullTokenizer:
    """Megatron-LM's NullTokenizer: ids are used as given; `vocab_size` ids plus the EOD id."""

    def __init__(self, vocab_size: int):
        self.eod = int(vocab_size)
        self.vocab_size = int(vocab_size) + 1
        self.pad = None

    def tokenize(self, text):
        return [int(t) for t in text.split()]

    def detokenize(self, ids):
        return " ".join(str(int(t)) for t in ids)


def build_tokenizer(args):
    if args.tokenizer_type == "NullTokenizer":
        return NullTokenizer(args.vocab_size)
    from megatron_patch import tokenizer as tokenizers

    kind = "SentencePieceTokenizer" if args.tokenizer_type == "GPTSentencePieceTokenizer" else args.tokenizer_type
    try:
        return tokenizers.build_tokenizer(kind, tokenizer_model=args.tokenizer_model,
                                          vocab_file=args.vocab_file, merge_file=args.merge_file)
    except ValueError as exc:
        raise SetupError(f"tokenizer: {exc}") from None


def tokenizer_identity(args, tokenizer) -> dict:
    """Type, size and sha256 of the files of this run's tokenizer (megatron_patch.data_identity)."""
    from megatron_patch import data_identity

    return data_identity.tokenizer_identity(args.tokenizer_type, tokenizer.vocab_size,
                                            tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file,
                                            merge_file=args.merge_file)


def check_vocabulary(args, tokenizer) -> None:
    """Refuse data made with another tokenizer: its recorded identity (<prefix>.tokenizer.json,
    written by tools/preprocess_data.py) must match this run's, and no id in the whole .bin may
    lie past the tokenizer's range (a cached chunked max, see megatron_patch.data_identity).
    Rank 0 reads the data; the verdict is shared, so every rank stops alike."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_patch import data_identity

    problem = ""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        mine = tokenizer_identity(args, tokenizer)
        for prefix in _prefixes(args):
            saved = data_identity.read_tokenizer_identity(prefix)
            differences = data_identity.identity_differences(saved, mine) if saved else []
            if differences:
                problem = (f"{prefix} was made with another tokenizer ({'; '.join(differences)}); use the "
                           "tokenizer it was made with, or remake the data with tools/preprocess_data.py")
                break
            top = data_identity.max_token_id(prefix, IndexedDataset(prefix, mmap=True).index.dtype)
            if top >= tokenizer.vocab_size:
                problem = (f"vocabulary mismatch: {prefix}.bin holds token id {top}, but the tokenizer "
                           f"({args.tokenizer_type}) has only {tokenizer.vocab_size} ids; use the tokenizer "
                           "the data was made with")
                break
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        shared = [problem]
        torch.distributed.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem:
        raise SetupError(problem)


def split_sizes(args):
    """Samples each split must provide (Megatron-LM's accounting)."""
    gbs = args.global_batch_size
    evals = (args.train_iters // args.eval_interval + 1) if args.eval_interval else 0
    return [args.train_iters * gbs, evals * args.eval_iters * gbs, args.eval_iters * gbs]


class _DatasetTokenizer:
    """What megatron-core's datasets read from a tokenizer: ids, and identifiers for cache keys.

    megatron-core keys its index caches (GPTDataset's, BlendedDataset's) by a hash of the path,
    the config and these identifiers, not by the data: a corpus remade under the same prefix
    would reuse the old indices. The fingerprint of every .idx read (data_identity) goes in too."""

    def __init__(self, tokenizer, args):
        self.vocab_size, self.eod = tokenizer.vocab_size, tokenizer.eod
        self.pad = getattr(tokenizer, "pad", None)
        if self.pad is None:
            del self.pad  # megatron-core then uses its own out-of-vocabulary pad id
        self.unique_identifiers = {"class": args.tokenizer_type, "vocab_size": self.vocab_size,
                                   "eod": self.eod, "model": args.tokenizer_model,
                                   "vocab_file": args.vocab_file, "merge_file": args.merge_file}
        if not args.mock_data:
            from megatron_patch.data_identity import index_fingerprint

            self.unique_identifiers["data_idx_sha256"] = {p: index_fingerprint(p) for p in _prefixes(args)}


def _prefixes(args):
    """Every dataset prefix of the run (the blend, or the per-split blends), sorted."""
    blends = [args.data_blend] + (args.data_blend_per_split or [])
    return sorted({p for blend in filter(None, blends) for p in blend[0]})


def _dataset_config(args, tokenizer):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    try:
        return GPTDatasetConfig(
            random_seed=args.seed,
            sequence_length=args.seq_length,
            blend=args.data_blend,
            blend_per_split=args.data_blend_per_split,
            split=args.split if args.data_blend or args.mock_data else None,
            path_to_cache=args.data_cache_path,
            mmap_bin_files=args.mmap_bin_files,
            tokenizer=_DatasetTokenizer(tokenizer, args),
            reset_position_ids=args.reset_position_ids,
            reset_attention_mask=args.reset_attention_mask,
            eod_mask_loss=args.eod_mask_loss,
            create_attention_mask=args.create_attention_mask_in_dataloader,
        )
    except (AssertionError, ValueError) as exc:
        raise SetupError(f"dataset configuration (--split {args.split!r}?): {exc}") from None


def _refuse_empty_splits(config, sizes) -> None:
    """GPTDataset loops forever on a split with no sequences (facts §2): refuse it clearly."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if config.mock or config.split_matrix is None:
        return
    for i, bounds in enumerate(config.split_matrix):
        if bounds is None:
            continue
        if sizes[i] == 0:  # not needed: do not build it (an empty one would hang)
            config.split_matrix[i] = None
            continue
        for prefix in config.blend[0]:
            n = len(IndexedDataset(prefix, mmap=True))
            if int(round(bounds[1] * n)) - int(round(bounds[0] * n)) <= 0:
                raise SetupError(
                    f"the {_SPLITS[i]} split of {prefix} is empty ({n} sequences, --split "
                    f"{config.split!r}); give it a larger share, use more data, or --eval-iters 0")


def build_datasets(args, tokenizer):
    """(train, valid, test) megatron-core datasets; None where a split is not wanted."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    config = _dataset_config(args, tokenizer)
    sizes = split_sizes(args)
    _refuse_empty_splits(config, sizes)
    if config.blend_per_split:
        for i, blend in enumerate(config.blend_per_split):
            if blend is not None and sizes[i] == 0:
                config.blend_per_split[i] = None
    cls = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()


class MicroBatchIterator:
    """Micro-batches of one data-parallel rank, starting after `consumed` samples.

    The global batch at sample offset c holds samples [c, c + global_batch); micro-batch k of
    DP rank r holds [c + (k*dp + r)*mbs, ... + mbs), as Megatron-LM's pretraining sampler. The
    union over DP ranks is layout-independent, so DP=1 and DP=2 see the same global batches.
    Past the end of the dataset it wraps around (validation repeats). With `prefetch`, one
    thread reads the next micro-batch while the current one trains (reads are deterministic, so
    this changes nothing but speed; the checkpoint stores sample counts, not iterator state).
    """

    def __init__(self, dataset, micro_batch_size, dp_rank, dp_size, consumed, device, prefetch=True):
        self.dataset, self.mbs, self.device = dataset, micro_batch_size, device
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.next_start = consumed  # first sample of the next (mbs x dp) block
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="batch-prefetch") if prefetch else None
        self._pending = None

    def __iter__(self):
        return self

    def _read(self, first):
        n = len(self.dataset)
        samples = [self.dataset[(first + j) % n] for j in range(self.mbs)]
        # A blend's samples carry the numpy integer "dataset_id" (megatron-core's BlendedDataset)
        # beside the tensors: as_tensor makes it a batch of ids like the other fields.
        return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]}

    def _take_start(self):
        first = self.next_start + self.dp_rank * self.mbs
        self.next_start += self.mbs * self.dp_size
        return first

    def __next__(self):
        if self._pool is None:
            batch = self._read(self._take_start())
        else:
            pending = self._pending or self._pool.submit(self._read, self._take_start())
            self._pending = self._pool.submit(self._read, self._take_start())
            batch = pending.result()
        return {k: v.to(self.device) for k, v in batch.items()}

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def make_iterator(args, dataset, consumed, device):
    from megatron.core import parallel_state

    if dataset is None or len(dataset) == 0:
        return None
    return MicroBatchIterator(dataset, args.micro_batch_size,
                              parallel_state.get_data_parallel_rank(),
                              parallel_state.get_data_parallel_world_size(), consumed, device,
                              prefetch=args.num_workers > 0)
