"""The web app: a JSON API (server.py) and a single page (static/) over one RUN directory."""
