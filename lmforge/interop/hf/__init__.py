"""Hugging Face transformers directories in (`importer.import_hf`) and out (`exporter.export_hf`): GPT-2, Llama,
Arcee and Qwen3. `layout` holds the tensor names on both sides, `tokenizer` the tokenizer files. lmforge itself
never needs transformers: both directions are a renaming of tensors."""

from lmforge.interop.hf.exporter import export_hf
from lmforge.interop.hf.importer import import_hf

__all__ = ["export_hf", "import_hf"]
