"""`POST /v1/completions`: wire type (protocol.py), the route (serving.py), the plain builder (plain.py)."""
