"""stellar: a fast, complete implementation of STELLAR (sparse concept tokens x localization)."""
__version__ = "0.1.0"
