"""Continued self-supervised pretraining (Lightning)."""
