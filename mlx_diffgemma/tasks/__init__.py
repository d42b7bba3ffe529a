"""Canvas tasks: what a layout of fixed, seeded and limited positions makes of the model.

- infill.py: holes in a text (`infill`, `InfillTemplate`; the `infill` command).
- structured.py: JSON and table skeletons, token classes.
- json_schema.py: a JSON Schema (or pydantic model) decided canvas by canvas.
- sudoku.py: the Sudoku toy's puzzles, layout and solver.
"""
