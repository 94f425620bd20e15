"""Evaluation, plots and reports."""
