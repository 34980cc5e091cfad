"""The `geo` stage: country, continent and H3 cell of every chip centre (Natural Earth, offline).

Runs first so captions can name the place and dedup and balancing can group by cell. It drops nothing:
a chip without georeference (captioned datasets) keeps null place columns.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam

from pipeline.curation import io
from pipeline.curation.job import ShardStep, StageContext


class AnnotateShard(ShardStep):
    """Add the place columns to one shard (and `image_key`, which every later stage relies on)."""

    def on_setup(self) -> None:
        """Load the boundaries once per worker."""
        from pipeline.curation.geo import CountryIndex

        self.index = CountryIndex.load(self.params.boundaries)

    def write(self, shard: str, fp: str, extra: Any) -> dict[str, int]:
        """Look up every row's centre."""
        from pipeline.curation.geo import h3_cells

        table = io.conform(io.read_table(self.ctx.input_dir, shard))
        lons, lats = table.column("lon").to_pylist(), table.column("lat").to_pylist()
        countries = self.index.lookup(lons, lats, self.params.max_sea_km)
        table = io.with_columns(table, {
            "image_key": table.column("key"),
            "country_iso3": [c.iso3 if c else None for c in countries],
            "country": [c.name if c else None for c in countries],
            "continent": [c.continent if c else None for c in countries],
            "h3_cell": h3_cells(lons, lats, self.params.h3_resolution),
        })
        return io.write_shard(self.ctx.output_dir, shard, table, [], fp)


def build(tasks: beam.PCollection, ctx: StageContext) -> Any:
    """One step: annotate each shard."""
    return tasks | "geo:Annotate" >> beam.ParDo(AnnotateShard(ctx))
