"""cai: Constitutional AI from a versioned YAML constitution to aligned data and models."""

__version__ = "0.1.0"
