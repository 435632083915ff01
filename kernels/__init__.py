"""Fused ops for applying and scoring pruning, each with a pure-torch ``*_ref`` twin.

Installed as ``vtprune.kernels`` (the repository keeps it at the top level, one op per file).
"""
