"""The language model: loading (HF folders, hub ids, GGUF), hook points and hooks, and the
text corpora that feed every pass."""
