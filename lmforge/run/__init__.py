"""The run directory, the unit every command passes around, one module per job:

- `directory`: the layout's file names; the config and tokenizer files; creating a run, refusing to replace one
  that is not ours, repairing what a kill left, removing a failed start; the one-writer lock; runs imported from
  weights trained elsewhere
- `checkpoints`: listing and resolving checkpoints (and the best one), saving and loading them (weights,
  optimizer, RNG state), pruning, the weights' fingerprints and the LoRA runs that depend on a checkpoint
- `log`: the typed records of log.jsonl, the writer, the reader and the trim on resume

This module knows files, not training: the trainer, the inference loader, import/export and the report all
read and write runs through it.
"""
