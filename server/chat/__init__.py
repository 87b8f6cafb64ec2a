"""`POST /v1/chat/completions`: wire types (protocol.py), the route (serving.py), the THOR-off builder (plain.py)."""
