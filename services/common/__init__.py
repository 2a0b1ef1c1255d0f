"""The library both services build on: settings, errors, the Ouro layer and the guarded client.

It is never run on its own; each service imports what it needs from the modules below.
"""
