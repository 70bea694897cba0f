"""The one error type the trainer shows to users as a single line (no traceback)."""


class SetupError(Exception):
    """Bad flags, data, tokenizer or checkpoint: the message names the problem and the fix.

    pretrain_gpt.py prints it as one line `pretrain_gpt.py: error: <message>` and exits with
    status 1 before anything is written.
    """
