"""The state of a phase's run, one word each, wherever it is read: DVC's queue, the drainer's
claims, the results table.

The values are the claim records' words: claims are persisted as JSON (.dvc/tmp, Git refs of a
shared plan), and a StrEnum serialises as its value. DVC's queue and the results table's
`state` column capitalise the word (`label`).
"""

from __future__ import annotations

from enum import StrEnum, auto


class Status(StrEnum):
    QUEUED = auto()
    RUNNING = auto()
    SUCCESS = auto()
    FAILED = auto()
    STUCK = auto()  # Running in DVC's queue, but its worker is gone
    MISSING = auto()  # a phase run with no attempt
    STALE = auto()  # a phase run whose every attempt is stale
    CLAIMED = auto()  # taken from DVC's queue by the drainer, not started: reads as Queued
    INTERRUPTED = auto()  # stopped by a signal, to be run again: reads as Queued
    PAUSED = auto()  # at a budget rung, waiting for the rung's judgement
    PRUNED = auto()  # stopped at a budget rung
    EXCLUDED = auto()  # fails a requirement by its params: never trained

    @property
    def label(self) -> str:
        """As DVC's queue and the results table's `state` column write it: `Success`."""
        return self.value.capitalize()
