"""Command-line pieces the studies share: comma-separated lists and names picked from a table."""


def comma_list(text: str, kind=str) -> list:
    """'1e-3,3e-3' -> [0.001, 0.003] with kind=float; empty items are dropped."""
    return [kind(item) for item in text.split(",") if item]


def known_names(parser, text: str, known, what: str = "method") -> list:
    """The comma-separated names in `text`, each a key of `known`; any other exits through
    parser.error naming it and the choices."""
    names = comma_list(text)
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return names
