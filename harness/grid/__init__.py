"""Grids: a grid YAML -> frozen cells (:mod:`.grid_file`), and a grid's micro-scale rehearsal
(:mod:`.rehearsal`). The names below are the grid file's; the rehearsal is imported on its own."""

from harness.grid.grid_file import (
    ABLATIONS_DIR,
    DEFAULT_MARGIN,
    MILAN_BASELINES,
    RANDOM_INIT_NAME,
    Axis,
    Cell,
    Grid,
    GridFile,
    Resources,
    build_grid,
    cell_name,
    find_grid_file,
    load_grid,
    short_axis,
)

__all__ = ["ABLATIONS_DIR", "DEFAULT_MARGIN", "MILAN_BASELINES", "RANDOM_INIT_NAME", "Axis", "Cell", "Grid",
           "GridFile", "Resources", "build_grid", "cell_name", "find_grid_file", "load_grid", "short_axis"]
