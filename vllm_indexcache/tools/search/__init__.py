"""IndexCache greedy layer search (paper §3.1.2, Algorithm 1): algorithm, scorers, resumable state, CLI."""
