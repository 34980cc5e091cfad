"""The `text2earth` command: one subcommand per DVC stage.

Each subcommand lives in its own module under `stages/` and only parses arguments and params before
calling the job in `pipeline/` (or `model/`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.beam_worker import DropHarnessChatter
from pipeline.errors import Text2EarthError
from stages import cards, curation, edit, evaluate, generate, harvest, publish, train

DESCRIPTION = """\
text2earth rebuilds a Git-10M-style remote-sensing image-text dataset and trains the Text2Earth
resolution-conditioned diffusion model on it. Each subcommand is one stage of `dvc.yaml`; run
`dvc repro` to rebuild everything that is out of date, or a subcommand to run one stage by hand.
Every subcommand has its own --help.
"""


class QuietLibraries(logging.Filter):
    """open_clip logs model construction at INFO on the root logger; keep its warnings only."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop INFO records that come from open_clip's files."""
        return record.levelno >= logging.WARNING or "open_clip" not in record.pathname


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every stage's subcommand."""
    parser = argparse.ArgumentParser(prog="text2earth", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    harvest.add_parser(subparsers)
    curation.add_parsers(subparsers)
    publish.add_parsers(subparsers)
    cards.add_parser(subparsers)
    train.add_parser(subparsers)
    generate.add_parser(subparsers)
    edit.add_parser(subparsers)
    evaluate.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("apache_beam", "rasterio", "distributed", "fsspec", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(DropHarnessChatter())
        if not args.verbose:
            handler.addFilter(QuietLibraries())
    unknown = [a for a in extra if a.startswith("--") is False and a.startswith("-")]
    if unknown:
        parser.error(f"unrecognised option(s): {' '.join(unknown)}")
    try:
        return int(args.run(args, extra))
    except Text2EarthError as exc:
        print(f"text2earth {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
