"""The one exception type the library raises for problems a user can act on.

Every message names the offending file or value and says what to do; the CLI prints it on one line and exits
non-zero, without a traceback. Subclasses only add a machine-readable detail for callers that triage errors
(they are still CosmosErrors with the same one-line messages).
"""


class CosmosError(Exception):
    """A user-facing error: bad input, a missing file, an incompatible checkpoint."""


class ImageDecodeError(CosmosError):
    """Image bytes that do not decode. `kind` says why, for callers that sort bad samples:
    "empty" (0 bytes), "not-image" (unknown format), "bomb" (refused as a decompression bomb),
    "corrupt" (truncated or damaged)."""

    KINDS = ("empty", "not-image", "bomb", "corrupt")

    def __init__(self, message: str, kind: str):
        if kind not in self.KINDS:
            raise ValueError(f"ImageDecodeError kind must be one of {self.KINDS}, got {kind!r}")
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keep `kind` through pickling (DataLoader and pool workers)
        return type(self), (str(self), self.kind)
