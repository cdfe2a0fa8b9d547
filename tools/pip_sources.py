"""pip's configured package sources, printed as uv options (`make setup` installs with uv, which reads none of pip's
configuration): its index, extra indexes, find-links folders and constraint files, from its config files and PIP_*
environment variables, so that uv takes each package from where pip would (on the development machines, local
wheel folders for torch)."""

import shlex
import subprocess
import sys
from pathlib import Path

OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
           "constraint": "--constraint"}


def pip_sources() -> list[str]:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    options: list[str] = []
    for line in listed.splitlines():  # e.g. global.extra-index-url='file:///a file:///b', :env:.find-links='/w'
        key, _, value = line.partition("=")
        option = OPTIONS.get(key.rpartition(".")[2])
        for item in shlex.split(value)[0].split() if option and value else []:
            local = Path(item.removeprefix("file://"))
            if item.startswith(("http://", "https://")) or local.exists():  # a folder or file another machine lacks
                pair = [option, item]
                if not any(options[i:i + 2] == pair for i in range(0, len(options), 2)):
                    options += pair
    return options


if __name__ == "__main__":
    print(shlex.join(pip_sources()))
