"""Reaching a video source: its facts and formats, the egress proxy, and fetching the span."""
