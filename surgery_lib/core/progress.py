"""Progress bars: tqdm's notebook-or-terminal bar, without its warning when ipywidgets is missing.

That warning carries an absolute local path and would leak into rendered notebooks.
"""

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from tqdm.auto import tqdm

__all__ = ["tqdm"]
