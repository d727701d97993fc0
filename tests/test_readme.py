"""The README works as written: every Python example runs when pasted alone (each in its own
interpreter, in an empty folder holding only the input it names), and the usage lines of
``codec encode``, ``decode`` and ``info`` list exactly the options those commands take."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from PIL import Image

from conftest import natural_image

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

#: the input files the examples read, made here (small, so that each example runs in about 2 s)
INPUTS = {"photo.png": (48, 64)}  # name: (height, width)


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block in the README."""
    return [(README.count("\n", 0, m.start()) + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", README, flags=re.S | re.M)]


BLOCKS = python_blocks()


def test_the_readme_has_its_python_examples():
    assert len(BLOCKS) >= 3
    assert any("Image.open" in code for _, code in BLOCKS)  # the Pillow example


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_python_example_runs_alone(code, tmp_path):
    """In a fresh interpreter, as a person pasting it would run it, with the bundled default model."""
    for name, (h, w) in INPUTS.items():
        Image.fromarray(natural_image(h, w)).save(tmp_path / name)
    # small images: one thread is fastest (with two, on a busy machine, they mostly wait for each other)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, f"the example fails when run alone:\n{p.stderr[-4000:]}"
    assert "CodecWarning" not in p.stderr, p.stderr[-4000:]  # the examples are clean
    # every file the example names exists afterwards: its inputs, and the outputs it writes
    for name in re.findall(r"""["']([\w.-]+\.(?:png|jpg|lic))["']""", code):
        assert (tmp_path / name).is_file(), f"{name} named in the example but not there"
        if name.endswith(".png") and name not in INPUTS:  # a decoded image: the input's size
            h, w = INPUTS["photo.png"]
            assert Image.open(tmp_path / name).size == (w, h)
    assert p.stdout.strip(), "the examples print what they show"
    for shown in re.findall(r"print\(.*\)\s*#\s*\.\.\. (\w+)", code):  # "print(...)  # ... RGBA": shows RGBA
        assert shown in p.stdout.split(), (shown, p.stdout)


# ------------------------------------------------------------------------------------------------
# usage lines


def usage_lines() -> dict[str, str]:
    """{"encode": "IN OUT [--quality Q | ...] ...", ...} from the first block of "Using the codec"
    (a command's line continues on the indented lines below it)."""
    section = README.split("\n## Using the codec\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    usage: dict[str, str] = {}
    command = None
    for line in block.splitlines():
        m = re.match(r"codec (\w+) (.*)", line)
        if m:
            command = m.group(1)
            usage[command] = m.group(2)
        elif line.strip():
            assert command and line.startswith(" "), line
            usage[command] += " " + line.strip()
    return usage


@pytest.mark.parametrize("command", ["encode", "decode", "info"])
def test_usage_lines_list_every_option(command):
    from lalic_codec.cli import main

    documented = set(re.findall(r"(?:\[|\| )(--?[a-z][a-z0-9-]*)", usage_lines()[command]))
    options = [p for p in main.commands[command].params if isinstance(p, click.Option)]
    accepted = {o for p in options for o in p.opts + p.secondary_opts}
    assert documented <= accepted, f"codec {command} has no {sorted(documented - accepted)}"
    missing = [p.opts for p in options if not documented & set(p.opts + p.secondary_opts)]
    assert not missing, f"README's usage line of codec {command} lacks {missing}"
    device = next((p for p in options if p.name == "device"), None)
    if device is not None:  # the choices shown are the choices taken
        shown = re.search(r"--device ([\w|]+)", usage_lines()[command]).group(1).split("|")
        assert shown == list(device.type.choices)


def test_project_layout_names_every_module_and_environment_variable():
    """The layout section tells the truth: every module of the package and every folder of the
    tree is named in it, and every LALIC_* variable the code reads is documented."""
    layout = README[README.index("## Project layout"):]
    missing = []
    for folder in ("lalic_codec", "models", "kernels", "formats", "tests", "benchmarks"):
        if f"`{folder}/" not in layout:
            missing.append(folder + "/")
    for path in sorted((ROOT / "lalic_codec").rglob("*.py")):
        rel = path.relative_to(ROOT / "lalic_codec")
        if path.name == "__init__.py" or path.name == "__main__.py":
            continue
        named = path.name in layout or (len(rel.parts) > 1 and f"lalic_codec/{rel.parts[0]}/" in layout)
        if not named:
            missing.append(str(rel))
    for path in sorted((ROOT / "models").glob("*.py")):
        if path.name != "__init__.py" and path.name not in layout:
            missing.append("models/" + path.name)
    assert not missing, f"not in the README's project layout: {missing}"
    used = set()
    for folder in ("lalic_codec", "models", "kernels", "formats", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            used |= set(re.findall(r"\bLALIC_[A-Z0-9_]+\b", path.read_text(encoding="utf-8")))
    used -= {"LALIC_SD"}  # a test's constant, not a variable
    undocumented = sorted(v for v in used if f"`{v}" not in layout)
    assert not undocumented, f"environment variables the README does not document: {undocumented}"
