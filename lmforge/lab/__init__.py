"""The learning lab: runs side by side (compare), hyperparameter search (sweep) and teaching plots."""
