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


def _location(loc: tuple[int | str, ...], drop: Collection[str]) -> str:
    return ".".join(str(p) for p in loc if str(p) not in drop and not _UNION_MEMBER.match(str(p)))


def problems(exc: ValidationError, *, drop: Collection[str] = ()) -> list[tuple[str, str]]:
    """Each error as (location, message); ``drop`` names more path parts to leave out."""
    return [
        (_location(err["loc"], drop), err["msg"].removeprefix("Value error, "))
        for err in exc.errors(include_url=False, include_input=False)
    ]


def first_problem(exc: ValidationError) -> tuple[str | None, str]:
    """The most specific error as (location or None, "location: message") — a client's 400.

    Of a union's failed members the client meant the one that got furthest: the error
    that lies deepest, and at equal depth one that is not merely "not of this type"
    (``input: []`` is a list that is too short, not "not a valid string").
    """
    errors = exc.errors(include_url=False, include_input=False)
    best = max(
        errors, key=lambda e: (len(_location(e["loc"], ())), not e["type"].endswith("_type"))
    )
    where = _location(best["loc"], ())
    message = best["msg"].removeprefix("Value error, ")
    return where or None, f"{where}: {message}" if where else message
