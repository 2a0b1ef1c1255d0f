"""Cutting a fetched span into the clip: smart cut, or a whole re-encode."""
