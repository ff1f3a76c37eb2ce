"""Backends: what writes a reply. ``server/`` talks to a chat server over the OpenAI API."""
