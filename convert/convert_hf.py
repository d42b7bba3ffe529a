"""Convert a DiffusionGemma checkpoint to MLX from a checkout (no install needed).

    python convert/convert_hf.py --hf-path google/diffusiongemma-26B-A4B-it -q

Same flags as `python -m mlx_diffgemma.convert`; see convert/README.md.
"""

import sys
from pathlib import Path

# Run from a checkout: import the package next to this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_diffgemma.convert import main  # noqa: E402

if __name__ == "__main__":
    main()
