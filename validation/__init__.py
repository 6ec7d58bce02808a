"""Sanity checks of attribution methods on an exported package, the gate policy and its reports."""
