"""Exporters: one module per format, all reading the component descriptions in ``components``."""
