"""Fine-tuning tasks: data records, the chat template, heads and metrics."""
