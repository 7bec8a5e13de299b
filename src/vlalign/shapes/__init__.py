"""The shapes world: vlalign's embedded default (world, rendering, tasks, vocabulary, its rewards and scorers)."""
