"""`python -m kaggle_vit`: the same command line as `kaggle-vit` (what torchrun's `-m` starts)."""
from .cli import main

main()
