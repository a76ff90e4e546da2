"""One-line notices below the CLI (a cache rebuilt, a fold resumed or restarted).

Library code logs to the `kaggle_vit` logger; the CLI prints each record as one plain line on
stderr, and a fold worker forwards its records to the parent, which logs them again.
"""
from __future__ import annotations

import logging

log = logging.getLogger("kaggle_vit")


def notice(message: str) -> None:
    """Tell the user something happened that they did not ask for, in one line."""
    log.warning(message)
