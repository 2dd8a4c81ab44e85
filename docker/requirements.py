"""Print requirements from pyproject.toml, one a line, for the images' pip installs:
``torch`` (the torch dependency) or the name of an extra (``worker``, ``datasets``)."""

import sys

import tomllib  # Python 3.11 or newer

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
for name in sys.argv[2:]:
    if name == "torch":
        print("\n".join(d for d in project["dependencies"] if d.startswith("torch")))
    else:
        print("\n".join(project["optional-dependencies"][name]))
