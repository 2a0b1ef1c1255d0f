"""The compress-an-image route: the same image, smaller, in the same format."""
