"""The command line's arguments, one module per area: each `add_*` function declares one command's flags.

lmforge/cli.py assembles them into the one parser and pairs each command with the function that runs it. A flag
that sets a config key (`--engine`, `--parallel`, ...) and a flag whose choices a config key declares take those
choices from lmforge/config/, so a choice is written once.
"""
