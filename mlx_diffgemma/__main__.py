"""`python -m mlx_diffgemma generate|convert ...`"""

from .cli import main

main()
