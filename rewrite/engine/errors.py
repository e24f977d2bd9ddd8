"""The one exception family users catch (INTERFACE.md)."""


class SpinfxError(Exception):
    """Any spinfx failure. CLI exit code 1 unless a subclass says otherwise."""

    exit_code = 1


class BadInput(SpinfxError):
    """The user gave something unusable (missing dir, unknown recipe, corrupt file). Exit code 2."""

    exit_code = 2


class Unsupported(SpinfxError):
    """This structure cannot be rewritten soundly; the message names the nodes/modules and why. Exit 3."""

    exit_code = 3
