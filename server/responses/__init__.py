"""OpenAI's Responses API: request and input items (protocol.py), routes (serving.py), output items and events (builder.py)."""
