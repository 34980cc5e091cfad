"""Exception types that name the input and the fix.

Bad *configuration* raises (the stage stops with a message); bad *data* never raises out of a job:
it becomes a `rejected` row (see `pipeline.reasons`).
"""

from __future__ import annotations


class Text2EarthError(Exception):
    """Base class for errors the CLI reports as one clear line instead of a traceback."""


class ParamsError(Text2EarthError, ValueError):
    """A params.yaml or sources.yaml entry is unknown or has a bad value."""


class SourceError(Text2EarthError, ValueError):
    """A source cannot be read as configured (raised only where a whole source is unusable)."""


class SampleRejected(Exception):
    """A candidate sample is dropped; carries the machine-readable reason and a human detail."""

    def __init__(self, reason: str, detail: str = "", **fields: object) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.fields = fields  # measured values worth keeping in the rejected row (nodata_fraction...)
