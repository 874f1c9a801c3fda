"""Emit: sympy printers per backend and Jinja2 rendering of the generated modules."""
