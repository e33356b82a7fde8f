"""Worker processes for `aigis bench`: the servers under test, the load generators, raw inference.

Each module here runs as its own process (`python -m aigis.benchmarks.<module>`), so the CPU the client
spends is never mixed with the server's, and each server's CPU time can be read from /proc.
`tools/bench.py` starts them, feeds them a JSON spec on stdin and reads one JSON result line.
"""
