"""The package version: a leaf, so that modules below the package root (the autotuner's cache key,
``mpsconv info``) can read it without importing the whole package."""

__version__ = "0.1.0"
