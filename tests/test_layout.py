"""The README's Layout section against the source tree: every module it names exists, and every module
of the package is named there (a folder named without files, like bench/, covers its modules)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "simmim"


def layout() -> dict[str, set[str]]:
    """Folder ('' for the package root) -> the file names listed under it."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    listed: dict[str, set[str]] = {}
    folder = ""
    for line in block.splitlines()[2:]:  # the language tag's empty line, then src/simmim/
        head = re.match(r"  (\w+/)", line)
        if head:
            folder = head.group(1).rstrip("/")
            listed[folder] = set()
        elif re.match(r"  \w+\.py", line):
            folder = ""
        names = re.findall(r"\b(\w+\.py)\b", line)
        listed.setdefault(folder, set()).update(names)
    return listed


def test_readme_layout_names_every_module_and_only_existing_ones():
    listed = layout()
    for folder, names in listed.items():
        for name in names:
            assert (PACKAGE / folder / name).is_file(), f"README Layout names {folder}/{name}, which does not exist"
    for path in PACKAGE.rglob("*.py"):
        if path.name.startswith("__"):
            continue
        folder = path.parent.relative_to(PACKAGE).as_posix().replace(".", "")
        assert folder in listed, f"README Layout misses the folder {folder}/"
        assert not listed[folder] or path.name in listed[folder], f"README Layout misses {path.relative_to(PACKAGE)}"
