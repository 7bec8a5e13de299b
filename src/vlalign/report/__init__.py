"""The HTML report of a run folder: plots, gallery, summary tables (reads files only)."""
