"""obsdiff: one-shot OBS-Diff pruning of diffusion pipelines, and export to edge runtimes."""

__version__ = "0.1.0"
