"""Answer extraction from model completions: code, option letters, numbers, ReAct tool calls."""
