"""The CLI as a user runs it (`python -m megaswift ...`)."""
