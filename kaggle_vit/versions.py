"""The package versions the code needs, checked where they cannot be pinned: a Kaggle notebook
runs on whatever its image has preinstalled. pyproject.toml pins the same numbers (a test keeps
the two in step)."""
from __future__ import annotations

import re
from importlib import metadata

from .errors import KaggleVitError

# Why each floor: CPU AdamW(fused=True) and torch.amp.GradScaler(device) need torch 2.4;
# A.Compose(seed=) and fill= need albumentations 2.0 (its 3.x is another licence and API).
MINIMUM = {"torch": "2.4", "timm": "1.0.9", "albumentations": "2.0", "numpy": "1.24", "pandas": "2.0",
           "scikit-learn": "1.3", "optuna": "4.0", "rich": "13"}
BELOW = {"albumentations": "3"}


def version_tuple(text: str) -> tuple[int, ...]:
    """'2.4.1+cu121' → (2, 4, 1): the leading numbers of a version, enough to compare releases."""
    return tuple(int(m) for m in re.findall(r"\d+", text.split("+")[0])[:3])


def version_problems() -> list[str]:
    """One phrase per installed package outside its supported range ('torch 2.1.0 (need ≥ 2.4)')."""
    problems = []
    for name, low in MINIMUM.items():
        try:
            found = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed (need ≥ {low})")
            continue
        high = BELOW.get(name)
        if version_tuple(found) < version_tuple(low) or (high and version_tuple(found) >= version_tuple(high)):
            problems.append(f"{name} {found} (need ≥ {low}{f', < {high}' if high else ''})")
    return problems


def check_versions() -> str:
    """Raise one line naming every package the code cannot run with; return the versions found."""
    problems = version_problems()
    if problems:
        raise KaggleVitError("kaggle-vit needs other package versions: " + "; ".join(problems)
                             + " (pip install -U the named packages, or pick another notebook image)")
    return ", ".join(f"{name} {metadata.version(name)}" for name in MINIMUM)
