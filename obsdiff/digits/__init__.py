"""The digits example: the shipped default pipeline, its judge, and the evaluation built on them.

This is a worked example and the test fixture, not the pruning library: nothing under ``obsdiff``
outside this package imports it, except the ``evaluate`` command and the default-model trainer.
"""
