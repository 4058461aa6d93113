"""Evaluation: perplexity, generation metrics, the lm-eval harness adapter, comparisons of
models and the HTML run reports."""
