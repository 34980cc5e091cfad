"""Curation: turn harvested chips into captioned, CLIP-filtered, deduplicated, geographically balanced pairs.

Stages run in this order, each a Beam job behind its own DVC stage: geo -> caption -> clip -> filter ->
dedup -> curate. Every stage reads the previous stage's metadata and writes its own (images stay in the
harvest shards), plus a `rejected` table for every sample it drops.
"""
