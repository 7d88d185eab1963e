"""Calibration artifacts shipped with the package (Loki bases, MagicPIG centres)."""
