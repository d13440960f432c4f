"""The one error type of the demo's API (a message for the operator, a status code and a kind), and the
check of the text operators type, which answers with it."""

from __future__ import annotations

from typing import Any, Mapping

MAX_ID_LEN = 64


class DemoError(Exception):
    """An error the API answers with `status` and a message meant for the operator."""

    def __init__(self, message: str, status: int = 400, kind: str = "bad_request"):
        super().__init__(message)
        self.status = status
        self.kind = kind


def typed_text(value: Any, what: str, max_len: int, default: str | None = None) -> str:
    """`value` without surrounding spaces: at most `max_len` characters, none of them control characters;
    `default` when it is missing or blank (a DemoError when there is no default)."""
    value = value.strip() if isinstance(value, str) else ""
    if len(value) > max_len:
        raise DemoError(f"{what} is longer than {max_len} characters")
    if any(ord(c) < 32 for c in value):
        raise DemoError(f"{what} contains control characters")
    if not value and default is None:
        raise DemoError(f"{what} is missing")
    return value or default


def station_and_operator(fields: Mapping[str, Any]) -> tuple[str, str]:
    """The station and operator ids a request carries ("unknown" when not given)."""
    return (typed_text(fields.get("station"), "station id", MAX_ID_LEN, "unknown"),
            typed_text(fields.get("operator"), "operator id", MAX_ID_LEN, "unknown"))
