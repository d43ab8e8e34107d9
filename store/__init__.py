"""The memory store: SQL rows are the truth, FAISS is a rebuildable retrieval view.

Nothing here imports torch or model code: it stores arrays, bytes and rows.
"""
