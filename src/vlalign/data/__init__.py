"""Data: sample types and validation, file formats, batching, the shapes world, preference pairs."""
