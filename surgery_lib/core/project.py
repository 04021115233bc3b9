"""Project-wide constants. The repository URL lives here and nowhere else in the library."""

#: The one version of the package (pyproject.toml reads it from here); CHANGELOG.md says what changed.
__version__ = "0.2.0"

#: Where the book's Colab badges, launch buttons and install cells point.
REPOSITORY_URL = "https://github.com/surgery-book/surgery-book"
