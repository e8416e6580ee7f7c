"""Benchmarks for mcrelay (``make bench``); see README "Performance"."""
