"""Small rules the config dataclasses share (counts, finite numbers, dtypes), so that each
config refuses bad values when it is built, with the option's name in the message. The CLI
builds every config right after parsing (cli.options.check_configs): bad input fails before
anything loads or is written."""
from __future__ import annotations

import math

from saeflow.errors import ConfigError

DTYPE_CHOICES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def flag(name: str) -> str:
    """The option of a config field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def at_least(obj: object, minimum: int | float, *names: str,
             error: type[Exception] = ConfigError) -> None:
    """Each field `names` of `obj` (when not None) is a number >= minimum."""
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or math.isnan(value) or value < minimum:
            raise error(f"{flag(name)} must be at least {minimum}, not {value!r}")


def finite(obj: object, *names: str, positive: bool = False,
           error: type[Exception] = ConfigError) -> None:
    """Each field `names` of `obj` (when not None) is a finite number (> 0 with `positive`)."""
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or (positive and value <= 0):
            what = "a positive finite number" if positive else "a finite number"
            raise error(f"{flag(name)} must be {what}, not {value!r}")


def fraction(obj: object, *names: str, error: type[Exception] = ConfigError) -> None:
    """Each field `names` of `obj` is a number in [0, 1]."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise error(f"{flag(name)} must be between 0 and 1, not {value!r}")


def dtype_choice(obj: object, *names: str, error: type[Exception] = ConfigError) -> None:
    """Each field `names` of `obj` is auto or a dtype saeflow computes in."""
    for name in names:
        value = getattr(obj, name)
        if str(value).removeprefix("torch.") not in DTYPE_CHOICES:
            raise error(f"{flag(name)} must be auto, float32, bfloat16 or float16, "
                        f"not {value!r}")
