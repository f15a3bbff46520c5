"""Gallery helpers for sphinx-gallery (kept in an importable module so that Sphinx can pickle the config)."""
from __future__ import annotations


class TightScraper:
    """sphinx-gallery's matplotlib scraper, saving with bbox_inches="tight" (titles and outside legends kept)."""

    def __repr__(self):
        return "diffusion_lab_docs_tight_matplotlib_scraper"

    def __call__(self, block, block_vars, gallery_conf, **kwargs):
        from sphinx_gallery.scrapers import matplotlib_scraper

        return matplotlib_scraper(block, block_vars, gallery_conf, bbox_inches="tight", **kwargs)
