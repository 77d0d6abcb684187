"""circuits: mechanistic-interpretability claims about small transformers, checked as pytest tests."""

__version__ = "0.1.0"
