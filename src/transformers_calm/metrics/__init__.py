"""Metrics shipped with transformers_calm as `evaluate` modules (package data): see `brierlm/`."""
