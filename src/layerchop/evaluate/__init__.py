"""Evaluation: perplexity (torchmetrics) and zero-shot accuracy (lm-evaluation-harness)."""
