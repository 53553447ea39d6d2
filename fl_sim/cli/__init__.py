"""The `fl-sim` command line: run, sweep, merge, demo."""
