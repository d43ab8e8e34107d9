"""The In-Context Autoencoder."""
