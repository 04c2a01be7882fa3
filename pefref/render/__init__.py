"""Renderers: pure functions from views to artefacts (diagrams, graphs, the site)."""
