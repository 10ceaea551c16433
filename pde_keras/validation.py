"""Argument checks shared by the public API: one message format everywhere.

Every check raises ``ValueError`` whose message names the argument, what is
allowed and what was received, e.g.::

    Invalid value for argument `boundary`: expected one of 'periodic',
    'neumann', 'dirichlet'. Received: boundary='bogus'
"""

import math
import numbers


def invalid(name, expected, value):
    """Returns the ValueError for argument `name` (raise it)."""
    return ValueError(
        f"Invalid value for argument `{name}`: expected {expected}. "
        f"Received: {name}={value!r}"
    )


def check_choice(name, value, choices):
    """Returns `value` if it is one of the strings `choices`."""
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise invalid(name, f"one of {allowed}", value)
    return value


def check_positive_int(name, value):
    """Returns `value` as int if it is an integer >= 1 (bools rejected)."""
    return check_int(name, value, minimum=1)


def check_int(name, value, minimum):
    """Returns `value` as int if it is an integer >= `minimum` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise invalid(name, f"an integer >= {minimum}", value)
    return int(value)


def check_float(name, value, *, positive=False, non_negative=False, below_one=False):
    """Returns `value` as float if it is a finite real number in range."""
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )
    if ok and positive and value <= 0:
        ok = False
    if ok and non_negative and value < 0:
        ok = False
    if ok and below_one and value >= 1:
        ok = False
    if not ok:
        qualifier = (
            "a positive finite number" if positive
            else "a finite number >= 0" if non_negative
            else "a finite number"
        )
        if below_one:
            qualifier += " below 1"
        raise invalid(name, qualifier, value)
    return float(value)


def first_line(error):
    """The first line of an exception's message (its type name when empty), for
    one-line error reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
