"""One base class for the mistakes a user can make; jobs map it to exit code 2."""


class CatdogError(Exception):
    """A user mistake (bad argument, missing input, output already there). Exit code 2."""


class InputError(CatdogError):
    """The input data is missing, empty or not usable as asked."""


class OutputExistsError(CatdogError):
    """The output location already holds results and neither overwrite nor resume was asked."""


class ModelLoadError(CatdogError):
    """A model artifact or weights file is missing, unreadable or unsafe to load."""


class ImageDecodeError(Exception):
    """One image could not be decoded; `kind` is a short stable label for error counts."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    def __str__(self) -> str:
        return f"{self.kind}: {super().__str__()}"


# Error kinds of a row that a later attempt may not repeat (a fixed link, a mount back, a store
# that answers again): `--resume` scores such rows again. Every other kind is a property of the
# file's bytes and stays until the file changes.
TRANSIENT_ERROR_KINDS = frozenset({"read_error", "read_timeout"})
