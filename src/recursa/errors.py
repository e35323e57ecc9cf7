"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class RecursaError(Exception):
    """Base for errors caused by user input (bad file, flag, preset, checkpoint)."""
