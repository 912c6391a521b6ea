"""Data: sources (download), tokenization and packing (prepare), offline zero-shot tasks."""
