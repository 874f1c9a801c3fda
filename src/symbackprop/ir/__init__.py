"""The array IR between derivation and printing (see :mod:`.nodes`).

``lower`` turns a derivation into a :class:`~.nodes.Program`; ``passes`` optimise one
generated function's statements; the printers in :mod:`symbackprop.emit.arrays` read it.
"""
