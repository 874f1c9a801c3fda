"""Render the README's derivation excerpt: the seed network's backward pass and gradients.

Run from the repository root (needs chromium):

    PYTHONPATH=src python docs/render_excerpt.py

It writes ``docs/derivation_seed_mlp.png`` from the HTML page ``symbackprop latex``
writes for ``examples/seed_mlp.yaml``, keeping only those two sections.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import symbackprop

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "derivation_seed_mlp.png"
WIDTH = 1100
MEASURE = """<script>
document.body.insertAdjacentHTML('beforeend', '<pre id="height">' +
  JSON.stringify(Math.ceil(document.documentElement.getBoundingClientRect().height)) +
  '</pre>');
</script>"""


def main() -> int:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("chromium is not installed", file=sys.stderr)
        return 1
    page = symbackprop.derive(ROOT / "examples" / "seed_mlp.yaml").html()
    sections = re.findall(r"<section>.*?</section>", page, re.S)
    keep = [s for s in sections if "The backward pass" in s or "The gradients" in s]
    head, _ = page.split("<body>", 1)
    excerpt = head + "<body>\n" + "\n".join(keep) + "\n</body>\n</html>\n"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 f"--user-data-dir={folder / 'profile'}", f"--window-size={WIDTH},2000"]
        (folder / "measure.html").write_text(excerpt.replace("</body>", MEASURE + "</body>"))
        res = subprocess.run([*flags, "--dump-dom", (folder / "measure.html").as_uri()],
                             capture_output=True, text=True, timeout=180, check=True)
        height = json.loads(re.search(r'<pre id="height">(\d+)</pre>', res.stdout).group(1))
        (folder / "excerpt.html").write_text(excerpt)
        flags[-1] = f"--window-size={WIDTH},{height}"
        subprocess.run([*flags, f"--screenshot={OUT}", (folder / "excerpt.html").as_uri()],
                       capture_output=True, text=True, timeout=180, check=True)
    print(f"wrote {OUT.relative_to(ROOT)} ({WIDTH} x {height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
