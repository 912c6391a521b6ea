"""LayerChop: reproducible LLM compression research (Just CHOP and baselines)."""

__version__ = "0.1.0"
