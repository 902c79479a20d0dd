"""What the command-line tools share: argument types that name the bad value, and errors printed as one line.

A mistake a user can make (a bad value, a missing or malformed file) ends the program with `error: ...` and a
non-zero exit code, never with a traceback from deep inside a library. Every numeric flag has a checked range, so a
value that would crash a run hours later, or silently do something else, is refused before any work starts.
"""

import argparse
import math
import sys

import torch

from pipeline_cond_ddpm import MAX_GUIDANCE_SCALE

USER_ERRORS = (ValueError, OSError, FloatingPointError)
MAX_RESOLUTION = 1024  # a 64x64 model is trained here; 1024 already needs a UNet far beyond the presets
MAX_SEED = 2**32 - 1  # numpy's generators take seeds below 2**32


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a usage error prints its one-line message and a pointer to --help, not the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n(see `{self.prog} --help` for every flag)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """`--help` keeps the description's layout (its example commands) and shows every flag's default."""


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


def integer(low: int, high: int | None = None):
    """An integer flag in [low, high] (no upper end without `high`)."""
    if high is None:
        return _checked(int, lambda v: v >= low, "a positive integer" if low == 1 else f"an integer >= {low}")
    return _checked(int, lambda v: low <= v <= high, f"an integer from {low} to {high}")


def number(low: float, high: float = math.inf, *, low_open=False, high_open=False, what="a number"):
    """A finite float flag in the interval from `low` to `high`, each end open or closed."""

    def inside(value):
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return math.isfinite(value) and above and below

    if high == math.inf:
        requirement = (
            "a positive number" if (low, low_open) == (0, True) else f"a number {'>' if low_open else '>='} {low:g}"
        )
    else:
        requirement = f"{what} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return _checked(float, inside, requirement)


positive_int = integer(1)
non_negative_int = integer(0)
positive_float = number(0, low_open=True)
non_negative_float = number(0)
probability = number(0, 1, high_open=True, what="a probability")
resolution = integer(1, MAX_RESOLUTION)
seed = integer(0, MAX_SEED)
guidance_scale = number(0, MAX_GUIDANCE_SCALE)


def device(text: str) -> str:
    """A torch device that exists on this machine: `cpu`, `cuda`, `cuda:1`, `mps`."""
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"must be a torch device such as cpu, cuda or cuda:0, got {text!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asks for a GPU, and torch sees none on this machine; use cpu")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asks for Apple's MPS, which is not available here; use cpu")
    return text


def run(command, *args):
    """Call `command(*args)`; a user error becomes `error: ...` on stderr and exit code 1."""
    try:
        return command(*args)
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
