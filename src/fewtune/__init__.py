"""fewtune: few-shot adaptation methods for language models, compared on equal footing."""

__version__ = "0.1.0"
