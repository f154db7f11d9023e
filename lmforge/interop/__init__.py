"""Other formats in and out: Hugging Face transformers directories (hf.py) and llm.c's binary files (llmc.py)."""
