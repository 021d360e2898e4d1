"""The repository's promises about itself: README's commands are the ones CI runs."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEST_COMMAND = "python -m pytest -q tests"


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    assert commands[0].endswith("fused-resnet verify")
    assert commands[1].endswith(TEST_COMMAND)
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"\n{TEST_COMMAND}\n" in ci
    for step in commands[1].split(" && ")[2:4]:  # the two pip installs, as CI runs them (it adds -q to one)
        assert step.replace("pip install ", "") in ci, step
