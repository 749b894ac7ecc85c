"""Values as JSON can carry them: numpy scalars and arrays as Python numbers and lists,
non-finite floats as null, floats rounded to 5 places."""
from __future__ import annotations

import numpy as np


def num(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return None if not np.isfinite(v) else round(float(v), 5)
    return v


def jsonable(v):
    if isinstance(v, np.ndarray):
        return [jsonable(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.integer, np.floating, float)):
        return num(v)
    return v
