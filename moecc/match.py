"""MatchResult: a pattern either matches with a value or fails with a reason a user can read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class MatchResult(Generic[T]):
    value: Any = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason

    @staticmethod
    def success(value: T) -> "MatchResult[T]":
        return MatchResult(value=value)

    @staticmethod
    def fail(reason: str) -> "MatchResult[T]":
        return MatchResult(reason=reason or "no match")

    def __bool__(self) -> bool:
        return self.ok
