"""The error types the trainer shows to users as a single line (no traceback)."""


class SetupError(Exception):
    """Bad flags, data, tokenizer or checkpoint: the message names the problem and the fix.

    pretrain_gpt.py prints it as one line `pretrain_gpt.py: error: <message>` and exits with
    status 1 before anything is written.
    """


class TrainingDiverged(RuntimeError):
    """The run diverged (non-finite gradients, or too many updates in a row skipped): a training
    outcome, not a setup problem. pretrain_gpt.py prints it as one line, exits 1, saves nothing."""
