"""Target profiles (TOML data), installed as ``obsdiff.targets``; read through ``obsdiff.resources``."""
