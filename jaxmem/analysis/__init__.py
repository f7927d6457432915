"""Analyses of run directories: scores, run I/O, and the paper's statistics and figures."""
