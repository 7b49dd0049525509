"""`skindistil --help` stays fast: building the parser imports no heavy library (they load inside
the commands that use them)."""

import subprocess
import sys

HEAVY = ("torch", "pandas", "lightning", "timm", "scipy", "matplotlib", "onnxruntime", "fastapi", "sklearn")


def test_building_the_parser_imports_no_heavy_library():
    code = (
        "import sys\n"
        "from skindistil.cli import build_parser\n"
        "build_parser()\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == []
