"""Who may ask and how much: API keys (keys.py), auth and rate limits (guards.py), request limits (limits.py), token metering (metering.py)."""
