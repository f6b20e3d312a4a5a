"""Reports computed from a dataset version folder (manifest.json, dropped.parquet): data, then rendered."""
