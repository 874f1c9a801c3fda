"""sympy-side derivation: stable primitive functions and the index calculus."""
