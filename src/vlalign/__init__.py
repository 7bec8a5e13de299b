"""vlalign: align large vision-language models with preference optimisation and deep RL."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vlalign")
    """The installed distribution's version (pyproject.toml's ``version``)."""
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
