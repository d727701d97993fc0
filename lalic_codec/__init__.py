"""lalic-codec: a learned image codec with its own .lic file format."""

__version__ = "0.1.0"
