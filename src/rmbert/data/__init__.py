"""MIND data: parsing and validation, planted data, download, batching."""
