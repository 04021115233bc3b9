"""Project-wide constants. The repository URL lives here and nowhere else in the library."""

__version__ = "0.1.0"

#: Where the book's Colab badges, launch buttons and install cells point.
REPOSITORY_URL = "https://github.com/surgery-book/surgery-book"
