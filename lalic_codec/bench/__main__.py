"""``python -m lalic_codec.bench``: the ``codec bench`` command."""

from .runner import cli

if __name__ == "__main__":
    cli(prog_name="python -m lalic_codec.bench")
