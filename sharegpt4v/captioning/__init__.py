"""Captioning: teacher client, local captioning engine, sharded exactly-once jobs, quality report."""
