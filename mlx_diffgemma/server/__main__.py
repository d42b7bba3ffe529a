"""`python -m mlx_diffgemma.server --model M [--adapter-path A] [--host H] [--port P]`."""

from .app import main

main()
