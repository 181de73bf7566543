"""README's set-up commands and .ci/run stay the same commands."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines() if line.strip()]


def test_readme_opens_with_install_and_test():
    cmds = _readme_setup_commands()
    assert len(cmds) == 2 and cmds[0].startswith("pip install") and "pytest" in cmds[1]


def test_ci_runs_readme_commands_verbatim():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for cmd in _readme_setup_commands():
        assert cmd in ci
