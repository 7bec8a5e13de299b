"""Models: loading Hugging Face image-text-to-text models, tiny offline builds, log-probs, heads."""
