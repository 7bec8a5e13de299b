"""vlalign: align large vision-language models with preference optimisation and deep RL."""

__version__ = "0.1.0"
