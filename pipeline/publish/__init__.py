"""Publishing: final WebDataset shards, GeoParquet metadata and checksums (data/git10m)."""
