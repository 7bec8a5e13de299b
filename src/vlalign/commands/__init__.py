"""The ``vlalign`` commands that are not recipes: thin layers that parse a config and call the library."""
