# The manual of snq, built with Sphinx:
#
#   sphinx-build -W --keep-going -b html docs build/docs
#
# scripts/test builds it (and runs its doctests) with warnings as errors.
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "_ext"))

import snq

project = "snq"
author = "the snq authors"
copyright = "the snq authors"
release = version = snq.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinxarg.ext",
    "epytext",
    "snqconfig",
]

root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"snq {release}"
pygments_style = "sphinx"
# Literal blocks (::) are log lines and output; code says its language.
highlight_language = "text"
# PHP examples are fragments, without "<?php".
highlight_options = {"php": {"startinline": True}}

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
# The API reference shows the handler API as its users write it.
autodoc_typehints = "description"
