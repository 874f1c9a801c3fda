"""Speed spellings met in the GPT examples compute what the plain expressions would.

Each is compared with the expression it replaces, on awkward values (signs, zeros,
overflow, -inf rows where a mask reaches them).
"""

from __future__ import annotations

import numpy as np
import sympy as sp

from symbackprop.emit.printers import NumpyCodePrinter


def test_numpy_prints_small_integer_powers_of_an_array_as_products() -> None:
    """numpy's power ufunc calls pow() per element for x**3 (milliseconds for a GELU's
    65536 entries); the product is the same number to within rounding, inf and NaN
    included."""
    printer = NumpyCodePrinter()
    x = sp.Symbol("x")
    assert printer.doprint(x**3) == "x*x*x"
    assert printer.doprint(x**4) == "x*x*x*x"
    assert printer.doprint(x**-3) == "1/x**3"  # unchanged (rare; not worth a rule)
    assert printer.doprint(x**2) == "x**2"  # numpy squares fast already
    assert printer.doprint((x + 1)**3) == "(x + 1)**3"  # never evaluated twice
    assert printer.doprint(x**5) == "x**5"
    values = np.array([0.0, -0.0, 1.5, -2.25, 1e-30, 3e12, -3e12, 1e103, np.inf, -np.inf,
                       np.nan], dtype=np.float64)
    for dtype in (np.float32, np.float64):
        big = np.isfinite(values) & (np.abs(values) > np.finfo(dtype).max)
        v = values[~big].astype(dtype)
        with np.errstate(all="ignore"):
            for n in (3, 4):
                got = eval(printer.doprint(x**n), {"x": v, "numpy": np})  # noqa: S307
                want = v**n
                assert got.dtype == want.dtype
                np.testing.assert_allclose(got, want, rtol=4 * np.finfo(dtype).eps)
