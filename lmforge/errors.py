"""The one exception type for mistakes a user can make; the CLI turns it into one line and exit code 2."""


class UserError(Exception):
    """Bad input from the user (missing file, bad config key, ...): reported without a traceback."""


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite; the sweep records such a trial as a result, not a failure."""
