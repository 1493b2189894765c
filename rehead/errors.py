class ReheadError(Exception):
    """A problem with the user's input: the message says what was wrong, the value, and what to do.

    The command line prints it without a traceback and exits with status 2.
    """
