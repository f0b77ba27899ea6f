"""The README's usage example runs as written (documentation that cannot drift from the code)."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_use_example_runs():
    text = README.read_text(encoding="utf-8")
    start = text.index("```python", text.index("## Use")) + len("```python")
    code = text[start:text.index("```", start)]
    namespace: dict = {}
    exec(compile(code, "README.md (## Use)", "exec"), namespace)  # noqa: S102
    assert namespace["img"].shape == (2, 64, 30, 41) and namespace["context"].shape == (2, 512)
