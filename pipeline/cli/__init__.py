"""The `calm-stream` command line: app.py is the root (the entry point), one module per command
group; each command parses its options, calls one function and prints."""
