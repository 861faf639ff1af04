"""Profiles and accuracy for people and tools: terminal table, JSON, CSV, Chrome trace, PNG, HTML."""
