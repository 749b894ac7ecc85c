"""The command line: a thin skin over the API, one module per wing; `main.py` builds the
parser and dispatches."""
