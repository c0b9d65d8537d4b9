"""The package's one exception type."""


class PkiError(Exception):
    """A refused operation or an unusable file.

    The message is meant for the person at the terminal: it names the file or
    the value at fault and says what was expected, and never holds key material.
    """
