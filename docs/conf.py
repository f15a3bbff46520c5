"""Sphinx configuration of the diffusion_lab documentation.

Build (from the repository root, after ``pip install -e ".[docs]"``)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The gallery (docs/examples/*.py) is executed at build time; the tables of the theory pages are written from the
live check catalogue and the residuals measured by ``python -m theory_checks --json docs/theory/catalogue.json --overwrite``.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS))
sys.path.insert(0, str(DOCS.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import types  # noqa: E402

import diffusion_lab  # noqa: E402

# The API reference lists the packages' modules; the ``__main__`` modules run a command when imported, so
# placeholders stand in for them while the site is built.
for _main in ("theory_checks.__main__", "diffusion_lab.__main__", "diffusion_lab.cli.__main__"):
    sys.modules.setdefault(_main, types.ModuleType(_main))

project = "diffusion_lab"
author = "diffusion_lab contributors"
copyright = "2026, diffusion_lab contributors"
release = diffusion_lab.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
    "sphinx_copybutton",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "README.md", "Thumbs.db", ".DS_Store", "examples/README.txt", "examples/*.py",
                    "auto_examples/*.ipynb", "auto_examples/*.py", "auto_examples/*.zip", "auto_examples/*.json",
                    "auto_examples/*.md5", "_generated/*", "**/.ipynb_checkpoints"]
templates_path = ["_templates"]
nitpicky = False

# -- MyST (markdown pages: results, architecture, guides) ------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- API reference ----------------------------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "show-inheritance": False, "member-order": "bysource"}
autodoc_typehints = "none"
autodoc_mock_imports: list[str] = []
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_validation_checks: set[str] = set()
numpydoc_xref_param_type = False


# -- Gallery: small scripts executed at build time ----------------------------------------------------------------
from _ext.gallery import TightScraper  # noqa: E402

sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "show_memory": False,
    "matplotlib_animations": False,
    "image_scrapers": (TightScraper(),),
    "reset_modules": ("matplotlib",),
    "plot_gallery": "True",
}

# -- copy button: copy the code, not the prompts -------------------------------------------------------------------
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = False

# -- HTML ---------------------------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"diffusion_lab {release}"
html_static_path: list[str] = []
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "header_links_before_dropdown": 7,
    "secondary_sidebar_items": ["page-toc"],
    "use_edit_page_button": False,
}
html_show_sourcelink = False
html_context = {"default_mode": "light"}


class _QuietEmptyGuideGlob(logging.Filter):
    """index.md lists the user guides by name, then globs guide/* so that a new guide page appears without an
    edit (theory/index.md likewise with its area pages); while every page is listed the glob matches nothing,
    which is expected (Sphinx gives this warning no type, so suppress_warnings cannot name it)."""

    def filter(self, record):
        message = record.getMessage()
        return not (message.startswith("toctree glob pattern") and ("'guide/*'" in message or "'*'" in message))


def setup(app):
    logging.getLogger("sphinx.sphinx.directives.other").addFilter(_QuietEmptyGuideGlob())
    from _ext import catalogue_tables, plain_math

    catalogue_tables.setup(app)
    plain_math.setup(app)
    return {"parallel_read_safe": True}
