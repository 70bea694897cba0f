"""The reference side of the cross-version tests: runs under megatron-core 0.16.1 (lane 10's
Python 3.11 .venv), writes what the 0.19.x side compares against, and is never imported by it
for figures: the figures come from this run, in the same CI lane, not from a stored file.

    .venv/bin/python -m tests.cross_version.reference OUT_DIR     # from the repository root

OUT_DIR gets the corpus both sides train on, reference.json ({megatron_core, runs: {name:
history}}) and ckpt/ (a run of RESUME_ITERS steps that saved at SAVE_AT: the checkpoint the
0.19.x side resumes, and the steps after SAVE_AT it must reproduce).
"""

import json
import sys
from pathlib import Path

ITERS = 10
RESUME_ITERS, SAVE_AT = 10, 5

# The three model options whose losses must agree across releases (10 steps each). fp16 starts at
# a loss scale of 2^16 so that the steps train instead of skipping the scaler's first overflows.
CONFIGS = {
    "scaled_embed": ["--scaled-embed"],
    "wesar": ["--wesar"],
    "embed_layernorm_fp16": ["--embed-layernorm", "--fp16", "--initial-loss-scale", 2 ** 16],
}
# The resumed run: the distributed optimizer and WeSaR's gates, so optimizer state of both kinds
# of parameter crosses the release boundary.
RESUME_FLAGS = ["--wesar", "--use-distributed-optimizer"]


def config_argv(name, corpus):
    from tests.train_helpers import tiny_args

    return tiny_args("--train-iters", ITERS, *CONFIGS[name], data=corpus)


def resume_argv(corpus, ckpt, *extra):
    from tests.train_helpers import tiny_args

    return tiny_args("--train-iters", RESUME_ITERS, *RESUME_FLAGS, *extra, data=corpus) + \
        ["--save", str(ckpt), "--save-interval", str(SAVE_AT)]


def corpus_prefix(out: Path) -> Path:
    return out / "data" / "tiny_text_document"


def main(out: Path) -> None:
    import megatron.core

    from megatron_patch import upstream
    from tests.train_helpers import make_corpus, run_inprocess

    corpus = make_corpus(corpus_prefix(out))
    runs = {name: run_inprocess(config_argv(name, corpus)).history for name in CONFIGS}
    runs["resume_source"] = run_inprocess(resume_argv(corpus, out / "ckpt")).history
    (out / "reference.json").write_text(json.dumps(
        {"megatron_core": str(upstream.VERSION), "megatron_core_raw": megatron.core.__version__,
         "python": sys.version.split()[0], "runs": runs}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
