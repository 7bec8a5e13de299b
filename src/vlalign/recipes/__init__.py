"""Training recipes: explicit loops, one module per recipe."""
