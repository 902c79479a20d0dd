"""What the command-line tools share: argument types that name the bad value, and errors printed as one line.

A mistake a user can make (a bad value, a missing or malformed file) ends the program with `error: ...` and a
non-zero exit code, never with a traceback from deep inside a library.
"""

import argparse
import math
import sys

USER_ERRORS = (ValueError, OSError, FloatingPointError)


def _checked(convert, test, requirement):
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    parse.__name__ = requirement  # argparse names the type in its messages
    return parse


positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: v > 0, "a positive number")
non_negative_float = _checked(float, lambda v: v >= 0, "a number >= 0")
finite_float = _checked(float, math.isfinite, "a finite number")
probability = _checked(float, lambda v: 0 <= v < 1, "a probability in [0, 1)")


def run(command, *args):
    """Call `command(*args)`; a user error becomes `error: ...` on stderr and exit code 1."""
    try:
        return command(*args)
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
