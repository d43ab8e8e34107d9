"""LangChain-native classes over icmem's public API."""
