"""balloon-lab's command line: the click group, one module per command, the one way to refuse bad input, a trial printed as text.

    checks.py                 One way for every command to refuse bad input: one line naming the option, exit 2.
    group.py                  The click group (`main`); each command lives in commands/.
    trial_text.py             One trial's result as text: what `balloon-lab run` prints, for a lab arm and a qemu arm.
    commands/                 (its own __init__.py)
"""
from lab.cli.group import main  # noqa: F401  (the `balloon-lab` entry point: lab.cli:main)
