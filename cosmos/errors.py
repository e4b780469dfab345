"""The one exception type the library raises for problems a user can act on.

Every message names the offending file or value and says what to do; the CLI prints it on one line and exits
non-zero, without a traceback.
"""


class CosmosError(Exception):
    """A user-facing error: bad input, a missing file, an incompatible checkpoint."""
