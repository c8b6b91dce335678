"""The error types every stage raises, by what the pipeline must do about them.

* `Poison`: the message will never apply, however often it is retried; the pipeline dead-letters
  it under `error_class` (a short stable name, for metrics and the dead-letter record) with
  `reason` (the precise cause, `str(e)`).
* `Transient`: nothing is wrong with the message, something it needs cannot be reached right now;
  the pipeline pauses and retries, and never dead-letters.
"""

from __future__ import annotations

__all__ = ["DeadLetterUnavailable", "DecodeError", "MappingError", "Poison", "RegistryUnavailable", "Transient"]


class Poison(Exception):
    """A message that will never apply: dead-letter it under `error_class` with `reason`."""

    def __init__(self, error_class: str, reason: str) -> None:
        # Both in args: an exception is pickled as its class called with its args.
        super().__init__(error_class, reason)
        self.error_class = error_class
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class DecodeError(Poison):
    """The message value does not decode to a Debezium change."""


class MappingError(Poison):
    """A decoded change that cannot become rows of its table."""


class Transient(Exception):
    """Something a message needs cannot be reached right now: retry, never dead-letter."""


class RegistryUnavailable(Transient):
    """The schema registry cannot answer right now."""


class DeadLetterUnavailable(Transient):
    """The dead-letter topic did not store a record: nothing may be written or committed past
    the message it stands for until it does."""
