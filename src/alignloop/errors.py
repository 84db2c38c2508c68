"""The one exception type that means "the user gave us something wrong".

The CLI prints its message as a single line and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input, bad config or a missing file: reported as one line, never a traceback."""


class TrainingDiverged(UserError):
    """Loss or gradients became NaN/inf; the last good checkpoint is kept."""
