"""The package version, in a module of its own so that every stage can record it without
importing the package's public face (which would tie the layers into a circle)."""
__version__ = "0.1.0"
