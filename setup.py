"""Ship the top-level ``templates/`` inside the wheel as ``symbackprop/templates``.

The templates live at the repository root (DESIGN.md's layout) so that they read as
part of the product, not as package internals; this hook copies them into the built
package so a non-editable install can still generate.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithTemplates(build_py):
    def run(self) -> None:
        super().run()
        source = Path(__file__).parent / "templates"
        target = Path(self.build_lib) / "symbackprop" / "templates"
        target.mkdir(parents=True, exist_ok=True)
        for template in sorted(source.glob("*.j2")):
            shutil.copy2(template, target / template.name)


setup(cmdclass={"build_py": BuildPyWithTemplates})
