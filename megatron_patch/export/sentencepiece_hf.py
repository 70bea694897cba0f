"""A transformers tokenizer that encodes exactly as the trainer's SentencePieceTokenizer.

The trainer calls plain `SentencePieceProcessor.EncodeAsIds(text)` (megatron_patch/tokenizer.py):
no BOS, no EOS, the model's own normalizer. transformers' sentencepiece converters add rules of
their own (Llama/T5 prefix-space handling, BOS post-processing), and its slow-style constructors
were seen to encode everything to [] under transformers 5. So the `tokenizers` pipeline is built
here from the .model's protobuf, one stage per sentencepiece stage:

  normalizer   precompiled charsmap (when the model has one, e.g. nmt_nfkc; empty for identity),
               then what sentencepiece's Normalizer does with spaces: remove_extra_whitespaces
               (leading/trailing spaces dropped, runs of spaces -> one), add_dummy_prefix
               (one "▁" before non-empty text), escape_whitespaces (" " -> "▁");
  pre-tokenizer none: sentencepiece encodes the whole normalized string, it does not split words;
  model        BPE: every NORMAL piece, and as merges every split of a NORMAL piece into two
               NORMAL pieces, ranked by the merged piece's score (sentencepiece merges the
               highest-scoring adjacent pair first); Unigram: pieces with their scores (Viterbi,
               as sentencepiece); byte_fallback as the model says;
  decoder      the unknown piece -> sentencepiece's unk surface (" ⁇ "), "▁" -> " ", byte pieces ->
               bytes, joined, and the dummy-prefix space removed.

`split_special_tokens=True`: the text "</s>" is encoded as characters, as sentencepiece does
(control pieces are never matched in text); the EOD id is still the tokenizer's eos_token_id.
Known difference: BPE merges whose merged piece can be made from two different splits are applied
leftmost-first by sentencepiece and in rank order here; none occurred on the tests' corpora.
"""

from .errors import ExportError

# sentencepiece_model.proto ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE, UNIGRAM = 2, 1  # TrainerSpec.ModelType


def read_model_proto(model_file: str):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:  # sentencepiece's protobuf bindings need the protobuf package
        raise ExportError(f"reading {model_file} needs protobuf ({exc}); pip install protobuf") from None
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _refuse_unsupported(proto, model_file: str) -> None:
    kinds = {p.type for p in proto.pieces}
    problems = []
    if USER_DEFINED in kinds:
        problems.append("user-defined pieces (sentencepiece matches them before the model)")
    if UNUSED in kinds:
        problems.append("unused pieces (sentencepiece re-splits merges into them)")
    if proto.trainer_spec.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix")
    if proto.trainer_spec.model_type not in (BPE, UNIGRAM):
        problems.append(f"model type {proto.trainer_spec.model_type} (only BPE and unigram)")
    if problems:
        raise ExportError(f"{model_file}: cannot build a transformers tokenizer for {'; '.join(problems)}; "
                          "train the tokenizer with tools/train_tokenizer.py")


def _model(proto):
    from tokenizers import models

    pieces = list(proto.pieces)
    unk = next((i for i, p in enumerate(pieces) if p.type == UNKNOWN), None)
    byte_fallback = bool(proto.trainer_spec.byte_fallback)
    if proto.trainer_spec.model_type == UNIGRAM:
        # sentencepiece's lattice holds only NORMAL pieces; `tokenizers` matches every vocabulary
        # entry in text, so "<s>", "<0x41>" and the like get a score no path of known characters
        # loses to. The lowest score also sets `tokenizers`' unknown-character penalty, which is
        # the same on every path (only the unknown node covers such a character), except against
        # such a literal: "</s>" in text whose "<" and ">" the model lacks encodes as id 2.
        floor = min((p.score for p in pieces if p.type == NORMAL), default=0.0) - 1e6
        vocab = [(p.piece, p.score if p.type == NORMAL else floor) for p in pieces]
        return models.Unigram(vocab, unk_id=unk, byte_fallback=byte_fallback)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    normal = {p.piece for p in pieces if p.type == NORMAL}
    ranked = []
    for i, p in enumerate(pieces):
        if p.type != NORMAL:
            continue
        for k in range(1, len(p.piece)):
            left, right = p.piece[:k], p.piece[k:]
            if left in normal and right in normal:
                ranked.append((-p.score, i, k, (left, right)))
    ranked.sort()
    return models.BPE(vocab=vocab, merges=[pair for *_, pair in ranked], byte_fallback=byte_fallback,
                      unk_token=pieces[unk].piece if unk is not None else None,
                      fuse_unk=True)  # sentencepiece emits one <unk> per run of unknown characters


def _normalizer(spec):
    from tokenizers import Regex, normalizers

    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # only " ", as sentencepiece (not tabs or newlines)
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))  # Prepend leaves empty text empty, as sentencepiece
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    return normalizers.Sequence(steps)


def _decoder(proto):
    from tokenizers import decoders

    spec = proto.normalizer_spec
    unk = [p.piece for p in proto.pieces if p.type == UNKNOWN]
    # sentencepiece writes an unknown piece as trainer_spec.unk_surface (" \u2047 " by default)
    steps = [decoders.Replace(unk[0], proto.trainer_spec.unk_surface)] if unk else []
    steps += [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    return decoders.Sequence(steps)


def hf_tokenizer(model_file: str, model_max_length: int = None):
    """transformers PreTrainedTokenizerFast for the sentencepiece model at `model_file` (ids equal
    EncodeAsIds; eos = the model's EOS piece, the trainer's end-of-document id)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    proto = read_model_proto(model_file)
    _refuse_unsupported(proto, model_file)
    tokenizer = Tokenizer(_model(proto))
    tokenizer.normalizer = _normalizer(proto.normalizer_spec)
    tokenizer.decoder = _decoder(proto)

    spec = proto.trainer_spec

    def piece(i):
        return proto.pieces[i].piece if 0 <= i < len(proto.pieces) else None

    if piece(spec.eos_id) is None:
        raise ExportError(f"{model_file} has no EOS piece, which the trainer uses as end of document")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=piece(spec.eos_id), bos_token=piece(spec.bos_id),
        unk_token=piece(spec.unk_id), pad_token=piece(spec.pad_id), split_special_tokens=True,
        clean_up_tokenization_spaces=False, **({"model_max_length": model_max_length} if model_max_length else {}))
