"""Dataset readers, fixed-shape batches and the datasets' release files."""
