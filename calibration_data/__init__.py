"""Calibration prompt sets (text data), installed as ``obsdiff.calibration_data``; read through ``obsdiff.resources``."""
