"""Benchmarks for casa_executors (see ``benchmarks.adl``)."""
