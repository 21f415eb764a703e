"""Data contracts: image validation, WebDataset shards, ingestion, inspection."""
