"""The one exception type a user sees: a mistake in their input, said in one sentence."""


class QtoolError(Exception):
    """Bad input or an impossible request.

    The message is a single sentence that names the file or option, the value
    that was given and what would be accepted. The CLI prints it without a
    traceback and exits with status 2.
    """
