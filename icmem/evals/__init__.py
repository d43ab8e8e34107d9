"""Evaluations: long-context perplexity and passkey, ICAE reconstruction."""
