"""The one error type that geodet raises for every expected failure."""


class GeodetError(Exception):
    """An expected failure: bad input, a bad setting, a missing file.

    The message says what is wrong and what to do; the CLI prints it as one line.
    """
