"""The export's error type, apart from the mappings so that importing it costs nothing."""


class ExportError(ValueError):
    """The checkpoint uses an option the target format cannot represent; the message names it."""
