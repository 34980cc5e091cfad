"""Apache Beam building blocks and jobs that harvest and curate the text2earth dataset.

Each module does one thing (expand sources, plan chips, read windows, compute GSD, encode, write a
shard); `pipeline.harvest` wires them into the harvest job. Nothing here imports torch, so Beam
workers start fast.
"""
