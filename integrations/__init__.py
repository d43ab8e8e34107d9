"""Adapters from icmem's public API to other frameworks (LangChain first)."""
