"""The one formatter of pydantic validation errors, for request bodies and the config file.

    >>> problems(exc)          # [("messages.0.role", "Input should be 'system', ...")]

Locations are dotted paths a person can find in their JSON or YAML: union members
and tags that pydantic adds to its paths (``prompt.list[str]``, ``models.0.remote``)
are dropped, and the ``Value error, `` prefix of our own validators' messages too.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from pydantic import ValidationError

# pydantic's names for union members: str, int, list[str], function-after[...]...
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|.*[\[\(].*)$")


def problems(exc: ValidationError, *, drop: Collection[str] = ()) -> list[tuple[str, str]]:
    """Each error as (location, message); ``drop`` names more path parts to leave out."""
    found = []
    for err in exc.errors(include_url=False, include_input=False):
        parts = [
            str(p) for p in err["loc"] if str(p) not in drop and not _UNION_MEMBER.match(str(p))
        ]
        found.append((".".join(parts), err["msg"].removeprefix("Value error, ")))
    return found


def first_problem(exc: ValidationError) -> tuple[str | None, str]:
    """The first error as (location or None, "location: message") — a client's 400."""
    where, message = problems(exc)[0]
    return where or None, f"{where}: {message}" if where else message
