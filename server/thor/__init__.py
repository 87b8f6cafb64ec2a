"""What THOR-on responses share: the chat/completions builder (builder.py) and the tool-call records (records.py)."""
