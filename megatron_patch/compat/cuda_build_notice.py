"""Keep the one-line errors one line where torch's CUDA build runs on a machine without a GPU.

Importing `torch.utils.cpp_extension` (megatron-core and DeepSpeed do) with a CUDA build of torch,
a CUDA_HOME on disk and no usable GPU logs "No CUDA runtime is found, using CUDA_HOME=..." on
stderr (a WARNING of the `torch.utils.cpp_extension` logger). On such a machine that is the
expected state, the CPU path runs, and the line would stand before every error this package
prints as one line. This filter drops that one record and nothing else; it is installed when
megatron_patch is imported, before anything imports cpp_extension. Python 3.12 has no CPU build
of torch within reach here, so CPU runs on 3.12 use the CUDA build.
"""

import logging

NOTICE = "No CUDA runtime is found"


class _DropNoCudaRuntimeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOTICE)


_FILTER = _DropNoCudaRuntimeNotice()


def install() -> None:
    """Idempotent."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
