"""Beam SDK worker process for local multi-process runs: the stock harness, with quiet logging.

FnApiRunner's own multi-processing mode starts `apache_beam.runners.worker.sdk_worker_main`, which
logs every connection at INFO to the console; this entry point keeps only warnings and errors.
"""

from __future__ import annotations

import logging
import sys

_CHATTER = (
    "semi_persistent_directory",  # every harness says it has no session file: irrelevant locally
    "direct_running_mode should be",  # our subprocess environment *is* the multi-process mode
    "apitools not found",  # Beam's optional GCP client: only Dataflow users need it, and they have it
)


class DropHarnessChatter(logging.Filter):
    """Beam start-up messages that say nothing to a user of a local run."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record but the known chatter."""
        message = record.getMessage()
        return not any(text in message for text in _CHATTER)


def quiet_local_runner_logs() -> None:
    """Install the filter on the driver-side loggers that relay worker start-up chatter."""
    for name in ("apache_beam.runners.portability.local_job_service",
                 "apache_beam.runners.portability.fn_api_runner.fn_runner"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropHarnessChatter) for f in logger.filters):
            logger.addFilter(DropHarnessChatter())


def main() -> None:
    """Run the SDK harness with console logging at WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.addFilter(DropHarnessChatter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s worker %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    from apache_beam.runners.worker import sdk_worker_main

    sdk_worker_main.main(sys.argv)


if __name__ == "__main__":
    main()
