"""The download-a-clip-from-youtube route: an exact time range of a video as an MP4."""
