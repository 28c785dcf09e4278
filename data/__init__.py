"""Shards: write, index, plan and stream image data sets."""
