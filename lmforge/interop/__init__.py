"""Other formats in and out: Hugging Face transformers directories (hf/), llm.c's binary files (llmc.py), and
which upstream architecture computes a model (architectures.py)."""
