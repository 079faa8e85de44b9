"""speedstructure: reproducible seismic velocity inversion (Speed & Structure challenge)."""

__version__ = "0.1.0"
