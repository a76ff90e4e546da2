"""The exceptions users see: the CLI prints each as one line (exit 2, or 130 for an interrupt)."""
from __future__ import annotations


class KaggleVitError(Exception):
    """A problem with the user's input (file, row, column named in the message), not a bug."""


class Interrupted(Exception):
    """Ctrl-C while folds trained; the message says which fold and epoch stopped."""

    @classmethod
    def during(cls, running: dict[int, tuple[int, int]]) -> "Interrupted":
        """From {fold: (epoch, epochs)} of the folds that were training (epoch 0: not started)."""
        parts = [f"fold {fold}, epoch {epoch} of {epochs}" if epoch else f"fold {fold} (starting)"
                 for fold, (epoch, epochs) in sorted(running.items())]
        where = f"during {' and '.join(parts)}" if parts else "between folds"
        return cls(f"interrupted {where}; the same command resumes")
