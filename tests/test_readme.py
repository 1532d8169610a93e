"""The README's command lines, read as a user would copy them: every `ride-fast train` or `ride-fast
data check` line (or torchrun line) with a recipe names the data it needs, so each works as written
(with the user's own data.root)."""
import re
import shlex
from pathlib import Path

from ride_fast.config import load_config

README = Path(__file__).resolve().parents[1] / "README.md"
ROOT = README.parent


def readme_commands() -> list[list[str]]:
    """Each command line of README.md's bash blocks (continuations joined, comments dropped) as argv."""
    text = README.read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    return [argv for argv in lines if argv]


def data_commands() -> list[list[str]]:
    """The `train` and `data check` lines that read a data set through a recipe: [recipe, override, ...]."""
    found = []
    for argv in readme_commands():
        rest = argv[argv.index("train") + 1:] if "train" in argv else argv[argv.index("check") + 1:] if "check" in argv else []
        if "--config" in rest:
            recipe = rest[rest.index("--config") + 1]
            overrides = [a for a in rest if "=" in a and not a.startswith("-")]
            found.append([recipe, *overrides])
    return found


def test_every_training_and_data_check_line_names_the_data_it_reads():
    commands = data_commands()
    assert any("--resume" in argv for argv in readme_commands() if "train" in argv)  # the resume lines are among them
    assert len(commands) >= 4, commands
    for recipe, *overrides in commands:
        data = load_config(ROOT / recipe, overrides).data
        assert data.name == "mnist_lt" or data.root, (
            f"README.md: `ride-fast ... --config {recipe} {' '.join(overrides)}` reads {data.name} but gives no data.root")
