"""The web app: a JSON API (server.py) and a single page (static/) over one RUN directory."""

DEFAULT_HOST = "127.0.0.1"  # localhost only: nothing is served to other machines unless asked
DEFAULT_PORT = 8765
