"""The language: YAML loading, the pydantic schema, expressions, checks and located errors.

Knows nothing of torch. Lower than every other layer but the primitive registry
(:mod:`pefref.ops`), whose metadata it reads to check expressions.
"""
